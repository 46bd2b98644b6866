"""The student registry: every buildable student architecture by name, with its input-size limits."""

from .catalog import FAMILIES, ArchInfo, check_input_size, list_models, model_info, resolve_arch
from .factory import cheap_params, create_model, model_params

__all__ = ["FAMILIES", "ArchInfo", "cheap_params", "check_input_size", "create_model", "list_models", "model_info",
           "model_params", "resolve_arch"]
