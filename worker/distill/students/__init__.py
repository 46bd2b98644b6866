"""The student registry: every buildable student architecture by name, with its input-size limits."""

from .catalog import ArchInfo, check_input_size, list_models, model_info
from .factory import create_model

__all__ = ["ArchInfo", "check_input_size", "create_model", "list_models", "model_info"]
