"""Which student architectures exist, what input sizes they take, and name resolution with suggestions."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

import torchvision

from ..errors import StudentError
from .cifar import SMALL_MODELS
from .timm_models import FAMILY as TIMM
from .timm_models import is_timm_arch, resolve_timm, timm_installed, timm_names, timm_size_problem, timm_sizes

TORCHVISION = "torchvision"
SMALL = "small"
FAMILIES = (TORCHVISION, SMALL, TIMM)

SMALL_DEFAULT_SIZE = 32
SMALL_MIN_SIZE = 8  # the smallest size the family is tested at; two stride-2 stages leave 2x2 maps
# Every torchvision classifier runs at 224, so it is the safe answer when the weights' meta is silent.
FALLBACK_SIZE = 224
# ViTs assert H == W == image_size and MaxViT's window partition is fixed at build time; random-init builds
# use image_size 224 whatever the pretrained weights' meta says (vit_h_14's SWAG weights say 518).
# Swin pads to its window size and runs at any size, so it is not fixed; its minimum stays the meta's
# 224/256, which is conservative (it also runs smaller).
FIXED_SIZE_PREFIXES: dict[str, int] = {"vit_": 224, "maxvit_": 224}


@dataclass(frozen=True)
class ArchInfo:
    """A student architecture and the input sizes it accepts (fixed_size: only default_input_size works)."""

    name: str
    family: str  # "torchvision", "small" or "timm"
    default_input_size: int
    min_input_size: int
    fixed_size: bool = False


@cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def _all_names() -> tuple[str, ...]:
    return tuple(sorted({*_torchvision_names(), *SMALL_MODELS}))


def list_models(filter: str | None = None, family: str | None = None, *, include_timm: bool = False) -> list[str]:
    """Student architecture names, sorted: torchvision classifiers and the small-input family, plus timm's
    models as `timm:<name>` with `include_timm` (when timm is installed) or family="timm". `filter` keeps names
    containing it (case-insensitive); `family` keeps one family."""
    if family is not None and family not in FAMILIES:
        raise StudentError(f"unknown model family {family!r}; the families are {', '.join(FAMILIES)}",
                           code="unknown_family")
    names: list[str] = []
    if family in (None, TORCHVISION):
        names += _torchvision_names()
    if family in (None, SMALL):
        names += SMALL_MODELS
    # Asking for the timm family without timm installed is an error worth the install hint; listing
    # everything without it is not.
    if family == TIMM or (family is None and include_timm and timm_installed()):
        names += timm_names()
    needle = (filter or "").strip().lower()
    return sorted({n for n in names if needle in n})


def resolve_arch(arch: str) -> str:
    """The canonical name for `arch` (case-insensitive; `timm:<name>` for timm), or StudentError listing close
    matches (StudentError(timm_not_installed) for a timm name without timm)."""
    if is_timm_arch(arch):
        return resolve_timm(arch)
    key = arch.strip().lower() if isinstance(arch, str) else ""
    if key in _all_names():
        return key
    matches = difflib.get_close_matches(key, _all_names(), n=3, cutoff=0.6)
    if timm_installed() and f"timm:{key}" in timm_names():
        matches = [f"timm:{key}", *matches[:2]]  # a timm name typed without its prefix
    hint = f"did you mean {', '.join(matches)}? " if matches else ""
    raise StudentError(f"unknown student architecture {arch!r}; {hint}"
                       "kdistill lists all names with `kdistill models`",
                       code="unknown_architecture", field="student.arch")


def model_info(arch: str) -> ArchInfo:
    """Family and input sizes of `arch`; raises StudentError(unknown_architecture) for unknown names."""
    return _model_info(resolve_arch(arch))


@cache
def _model_info(name: str) -> ArchInfo:
    if name in SMALL_MODELS:
        return ArchInfo(name, SMALL, SMALL_DEFAULT_SIZE, SMALL_MIN_SIZE)
    if is_timm_arch(name):
        sizes = timm_sizes(name)
        return ArchInfo(name, TIMM, sizes.default, sizes.minimum, fixed_size=sizes.fixed)
    for prefix, size in FIXED_SIZE_PREFIXES.items():
        if name.startswith(prefix):
            return ArchInfo(name, TORCHVISION, size, size, fixed_size=True)
    default, minimum = _sizes_from_weights(name)
    return ArchInfo(name, TORCHVISION, max(default, minimum), minimum)


def _sizes_from_weights(name: str) -> tuple[int, int]:
    # The pretrained weights' meta is torchvision's own record of the smallest input each model survives.
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return FALLBACK_SIZE, FALLBACK_SIZE
    min_size = weights.meta.get("min_size")
    minimum = max(min_size) if min_size else FALLBACK_SIZE
    crop = getattr(weights.transforms(), "crop_size", None)
    default = int(crop[0]) if crop else FALLBACK_SIZE
    return default, int(minimum)


def check_input_size(arch: str, size: tuple[int, int]) -> None:
    """Raise StudentError(input_too_small) when `arch` cannot run on (h, w) inputs; says which size works."""
    info = model_info(arch)
    h, w = size
    if info.fixed_size:
        if (h, w) != (info.default_input_size, info.default_input_size):
            raise StudentError(
                f"student {info.name!r} takes exactly {info.default_input_size}x{info.default_input_size} "
                f"inputs, got {h}x{w}; set student.input.size to {info.default_input_size}",
                code="input_too_small", field="student.input.size")
        return
    if min(h, w) < info.min_input_size:
        alternative = (", or pick a student made for small images such as resnet20 or wrn_16_2"
                       if info.family in (TORCHVISION, TIMM) else "")
        raise StudentError(
            f"student {info.name!r} needs inputs of at least {info.min_input_size}x{info.min_input_size}, "
            f"got {h}x{w}; set student.input.size to {info.min_input_size} or more "
            f"(its usual size is {info.default_input_size}){alternative}",
            code="input_too_small", field="student.input.size")
    if info.family == TIMM:
        _check_timm_size(info, (h, w))


def _check_timm_size(info: ArchInfo, size: tuple[int, int]) -> None:
    # Above its minimum a timm model can still refuse a size (window attention wants multiples of its window
    # times its stride); a shapes-only forward at exactly this size says so before any data is loaded.
    problem = timm_size_problem(info.name, size)
    if problem is not None:
        raise StudentError(
            f"student {info.name!r} does not run on {size[0]}x{size[1]} inputs ({problem}); set "
            f"student.input.size to a size it runs at, such as its usual {info.default_input_size}",
            code="input_too_small", field="student.input.size")
