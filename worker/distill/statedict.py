"""Reading weight files safely: safetensors, or a `.pt` state dict through `torch.load(weights_only=True)`."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import TeacherError, UnsafeCheckpointError

CONVERT_HINT = (
    "Save only the weights instead: `torch.save(model.state_dict(), 'model.pt')` or "
    "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`, and give the architecture "
    "name; or export the whole model to ONNX (`torch.onnx.export`) or TorchScript (`torch.jit.script`)."
)
# Messages of checkpoint readers that describe their own internals, not the upload: never shown to people.
_INTERNALS = ("enforce fail", "inline_container", "pytorchstreamreader", "miniz", "weightsunpickler",
              "weights only load failed")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"\S*\.(?:cc|cpp|cu|h|hpp):\d+\S*\s*(?:[\w:~<>]+\([^)]*\)\s*)?")
_TORCHSCRIPT_FAILED = "The following operation failed in the TorchScript interpreter"
_GLOBAL = re.compile(r"GLOBAL ([\w.]{1,120})")


def is_safetensors(path: Path) -> bool:
    """Safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a `code/` folder; plain `torch.save` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist()[:4096])
    except (zipfile.BadZipFile, EOFError, ValueError):
        return False  # a damaged zip: torch.load says so in its own words, mapped below


def library_detail(err: BaseException, limit: int = 200) -> str:
    """The first line of a library's error, fit to show the person who uploaded the file; "" when none is.

    ONNX Runtime's "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" prefix and C++ source locations are cut, a
    failure inside TorchScript gives its last line, and messages about a checkpoint reader's own internals
    ("[enforce fail at inline_container.cc:180] ...", "PytorchStreamReader failed ...") give "".
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[-1] if lines[0].startswith(_TORCHSCRIPT_FAILED) else lines[0]
    text = _ORT_PREFIX.sub("", text)
    if any(marker in text.lower() for marker in _INTERNALS):
        return ""
    text = _SOURCE_LOCATION.sub("", text).strip()
    return text if len(text) <= limit else text[:limit].rstrip() + "..."


def load_state_dict_file(path: str | Path, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a flat name→tensor mapping without ever unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise TeacherError(f"{what} file {p.name} does not exist", code="file_not_found")
    if p.stat().st_size == 0:
        raise TeacherError(f"{what} file {p.name} is empty; upload it again", code="unreadable_weights")
    if is_safetensors(p):
        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError):
            raise TeacherError(f"{what} file {p.name} is not a readable safetensors file: it is truncated or its "
                               "header is damaged; save it again with safetensors.torch.save_file",
                               code="unreadable_weights") from None
    if is_torchscript(p):
        raise TeacherError(f"{what} file {p.name} is a TorchScript archive, not a state dict; "
                           "upload it with format 'torchscript'", code="wrong_format")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words a refused global in several ways ("Unsupported global: ...", "unsupported GLOBAL
        # posix.system whose module posix is blocked", "Unsupported class ...")
        if not re.search(r"unsupported (global|class)", str(e), re.IGNORECASE):
            raise _not_a_checkpoint(p.name, what) from None
        found = _GLOBAL.search(str(e))
        refers = f", here {found.group(1)}" if found else ""
        raise UnsafeCheckpointError(
            f"{what} file {p.name} holds pickled Python objects (probably a whole nn.Module{refers}), "
            f"which kdistill never unpickles. {CONVERT_HINT}"
        ) from None
    except Exception:  # torch.load on a damaged file raises anything from IndexError to RuntimeError
        raise _not_a_checkpoint(p.name, what) from None
    return _flatten_state_dict(obj, p.name, what)


def _not_a_checkpoint(name: str, what: str) -> TeacherError:
    # torch's own words here are about its zip reader and unpickler ("[enforce fail at inline_container.cc:180]")
    return TeacherError(f"{what} file {name} is truncated, damaged or not a torch checkpoint (nor a safetensors "
                        "file); upload the file that torch.save or safetensors wrote, in full",
                        code="unreadable_weights")


def _flatten_state_dict(obj: object, name: str, what: str) -> dict[str, torch.Tensor]:
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"{what} file {name} does not hold a state dict (a mapping of names to tensors). "
                           f"{CONVERT_HINT}", code="unreadable_weights")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}
