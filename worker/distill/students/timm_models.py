"""Students from timm (`timm:<name>`): imported lazily, built offline, input sizes measured on the meta device.

timm is an optional extra, so nothing here imports it at module level. Models are only ever built with
pretrained=False from names in timm's own registry, so no build can reach the network (timm's `hf-hub:` and
`local-dir:` sources and pretrained tags are not names in that registry).
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType

import torch
from torch import nn

from ..errors import StudentError

PREFIX = "timm:"
FAMILY = "timm"
INSTALL_HINT = "pip install 'kdistill[timm]'"

# Distillation variants carry a second head for a teacher's token (DeiT, PiT, EfficientViM); students here are
# the distillation's target, and each such model has a plain sibling under its own name.
_DISTILLATION_VARIANT = re.compile(r"(^|_)distilled(_|$)|_dist$")
# Encoder towers of multimodal models (gemma4_vit_*_enc, qwen3_vit_*_enc, mobilenetv5_300m_enc) return token
# features whatever num_classes says: not classifiers.
_ENCODER_ONLY = re.compile(r"_enc$")
# Sizes tried, smallest first, when measuring the smallest input a model runs at. 8 is the floor: smaller
# inputs only survive a stride-32 network through padding, and the small family's own minimum is 8.
PROBE_SIZES = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
_PROBE_BATCH = 2  # train-mode BatchNorm needs more than one value per channel
_PROBE_CLASSES = 1000  # the meta model doubles as the parameter count at timm's default head
# The API validates jobs from several threads; a probe flips its shared meta model between train and eval.
_PROBE_LOCK = threading.Lock()


@dataclass(frozen=True)
class TimmSizes:
    """Input sizes of a timm model: its usual one (pretrained_cfg's input_size) and the smallest that runs."""

    default: int
    minimum: int
    fixed: bool  # position embeddings or windows sized at build time: pretrained_cfg says so and probes agree


def is_timm_arch(arch: object) -> bool:
    """Whether `arch` names a timm model (the `timm:` prefix, any case)."""
    return isinstance(arch, str) and arch.strip().lower().startswith(PREFIX)


def import_timm() -> ModuleType:
    """timm itself, or StudentError(timm_not_installed) saying how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise StudentError(f"timm students need the optional timm package: {INSTALL_HINT}",
                           code="timm_not_installed", field="student.arch") from None


def timm_installed() -> bool:
    """Whether timm can be imported here."""
    try:
        import_timm()
    except StudentError:
        return False
    return True


@cache
def _bare_names() -> frozenset[str]:
    return frozenset(n for n in import_timm().list_models()
                     if not _DISTILLATION_VARIANT.search(n) and not _ENCODER_ONLY.search(n))


def timm_names() -> list[str]:
    """Every timm student as `timm:<name>`, sorted; raises StudentError(timm_not_installed) without timm."""
    import_timm()  # the names are cached; the check is not, so an uninstalled timm always says so
    return sorted(PREFIX + n for n in _bare_names())


def resolve_timm(arch: str) -> str:
    """The canonical `timm:<name>` for `arch`, or StudentError(unknown_architecture) with close matches."""
    import_timm()
    bare = arch.strip().lower()[len(PREFIX):].strip()
    names = _bare_names()
    if bare in names:
        return PREFIX + bare
    matches = difflib.get_close_matches(bare, sorted(names), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + m for m in matches)}? " if matches else ""
    excluded = ""
    if bare in import_timm().list_models():
        excluded = (f"{bare!r} is a distillation variant, not a student; pick the plain model; "
                    if _DISTILLATION_VARIANT.search(bare) else f"{bare!r} is an encoder without a classifier; ")
    raise StudentError(f"unknown timm student architecture {arch!r}; {excluded}{hint}"
                       "kdistill lists all names with `kdistill models --family timm`",
                       code="unknown_architecture", field="student.arch")


def create_timm_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """A randomly initialised timm classifier `name` (canonical `timm:<name>`) returning plain logits; raises
    StudentError(invalid_student) when the model cannot take `in_channels` inputs (csatv2's stem is RGB-only)."""
    problem = _channels_problem(name, in_channels)
    if problem is not None:
        raise StudentError(f"timm model {name!r} does not work as a classifier of {in_channels}-channel images: "
                           f"{problem}", code="invalid_student", field="student.arch")
    return _create(name, num_classes=num_classes, in_channels=in_channels)


def _create(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    timm = import_timm()
    try:
        model = timm.create_model(_bare(name), pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # a builder that refuses these settings
        raise StudentError(f"timm cannot build {name!r} for {in_channels} input channels and {num_classes} "
                           f"classes: {_first_line(e)}", code="invalid_student", field="student.arch") from None
    # LeViT, EfficientFormer and SwiftFormer always carry a distillation head; with distilled training off their
    # forward averages both heads into one logits tensor instead of returning a (logits, logits_dist) pair.
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)
    return model


def timm_params(name: str, num_classes: int = _PROBE_CLASSES) -> int:
    """Parameter count of `name` with a `num_classes` head on 3-channel inputs, from a build on meta."""
    return _params(name, num_classes)


def timm_sizes(name: str) -> TimmSizes:
    """Usual and smallest input size of `name`: the usual one from timm's pretrained_cfg, the smallest measured
    by running the model on the meta device (shapes only, no compute) at PROBE_SIZES."""
    return _sizes(name)


def timm_size_problem(name: str, size: tuple[int, int]) -> str | None:
    """Why `name` cannot run on (h, w) inputs (the error of a shapes-only forward), or None when it can."""
    return _size_problem(name, int(size[0]), int(size[1]))


def _bare(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _build_on_meta(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    with torch.device("meta"):
        return _create(name, num_classes=num_classes, in_channels=in_channels)


@lru_cache(maxsize=4)  # the probes of one name come in bursts (info, then a size check); meta models hold no data
def _meta_model(name: str) -> nn.Module:
    return _build_on_meta(name, _PROBE_CLASSES)


@lru_cache(maxsize=256)
def _channels_problem(name: str, in_channels: int) -> str | None:
    # timm builds every model for any in_chans, but a stem that converts RGB fails only in the forward; a
    # shapes-only forward at the usual size finds it before a job trains.
    default = _sizes(name).default
    if in_channels == 3:
        return _size_problem(name, default, default)
    return _forward_problem(_build_on_meta(name, _PROBE_CLASSES, in_channels), in_channels, default, default)


@cache
def _params(name: str, num_classes: int) -> int:
    model = _meta_model(name) if num_classes == _PROBE_CLASSES else _build_on_meta(name, num_classes)
    return sum(p.numel() for p in model.parameters())


@cache
def _sizes(name: str) -> TimmSizes:
    cfg = import_timm().models.get_pretrained_cfg(_bare(name))
    input_size = getattr(cfg, "input_size", None) or (3, 224, 224)
    default = int(max(input_size[-2:]))
    # fixed_input_size describes the pretrained weights; some such models are built with dynamic_img_size
    # (timm's test_vit) and run at any size, so the flag is only believed when another size really fails.
    if getattr(cfg, "fixed_input_size", False) and _size_problem(name, default + 32, default + 32) is not None:
        return TimmSizes(default, default, fixed=True)
    minimum = next((s for s in PROBE_SIZES if s <= default and _size_problem(name, s, s) is None), default)
    return TimmSizes(default, minimum, fixed=False)


@lru_cache(maxsize=1024)
def _size_problem(name: str, h: int, w: int) -> str | None:
    return _forward_problem(_meta_model(name), 3, h, w)


def _forward_problem(model: nn.Module, channels: int, h: int, w: int) -> str | None:
    x = torch.empty(_PROBE_BATCH, channels, h, w, device="meta")
    for train in (True, False):  # training and export/evaluation take different paths in some models
        try:
            with _PROBE_LOCK, torch.no_grad():
                out = model.train(train)(x)
        except Exception as e:  # a shape error can come from any layer, as any exception type
            return _first_line(e)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (_PROBE_BATCH, _PROBE_CLASSES):
            return f"its forward returns {type(out).__name__}, not a [batch, classes] logits tensor"
    return None
