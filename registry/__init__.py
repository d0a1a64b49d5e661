"""The local store of task experts (`Registry`) and its Hugging Face Hub sync."""

from .store import AUTO, Entry, Registry, RegistryDamagedError, RegistryError, default_root, validate_task_name

__all__ = ["AUTO", "Entry", "Registry", "RegistryDamagedError", "RegistryError", "default_root", "validate_task_name"]
