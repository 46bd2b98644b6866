"""Reading weight files safely: safetensors, or a `.pt` state dict through `torch.load(weights_only=True)`."""

from __future__ import annotations

import pickle
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


def is_safetensors(path: Path) -> bool:
    """Safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a `code/` folder; plain `torch.save` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist()[:4096])


def load_state_dict_file(path: str | Path, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a flat name→tensor mapping without ever unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise TeacherError(f"{what} file {p} does not exist", code="file_not_found")
    if is_safetensors(p):
        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise TeacherError(f"{what} file {p.name} is not a readable safetensors file: {e}",
                               code="unreadable_weights") from None
    if is_torchscript(p):
        raise TeacherError(f"{what} file {p.name} is a TorchScript archive, not a state dict; "
                           "upload it with format 'torchscript'", code="wrong_format")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "Unsupported class" not in str(e):
            raise TeacherError(f"{what} file {p.name} is damaged or not a torch checkpoint: "
                               f"{str(e).splitlines()[0]}", code="unreadable_weights") from None
        raise UnsafeCheckpointError(
            f"{what} file {p.name} holds pickled Python objects (probably a whole nn.Module), "
            f"which kdistill never unpickles. {CONVERT_HINT} (loader said: {str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # torch.load on a damaged file raises anything from IndexError to RuntimeError
        raise TeacherError(f"{what} file {p.name} is neither safetensors nor a torch state dict: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           code="unreadable_weights") from None
    return _flatten_state_dict(obj, p.name, what)


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
