"""`load_model(base, adapter)`: a base model with a task's experts (or another method's adapter) in place.

`resolve_adapter` turns an adapter reference into a directory: a directory is used as it is, anything else is a
registry reference (`law`, `law@3`, `law@1f3a`), verified against its recorded sha256 before any weights load.
The directory's marker file then names the training method whose artifact it is, and that method loads it.
(`expert-hub serve` takes registry names and `NAME=DIR` pairs; it asks the registry itself, since it needs the
entry's version as well.)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .adapter import CONFIG_FILE, ExpertAdapter
from .errors import InvalidInputError
from .models import load_base
from .registry import Registry


def resolve_adapter(reference: str | Path, base: str | None) -> Path:
    """The directory an adapter reference names: itself when it is a directory, else the verified registry object
    of a task registered for `base` (for any base when None)."""
    if Path(reference).is_dir():
        return Path(reference)
    registry = Registry()
    return registry.verify(registry.resolve(str(reference), base))


def load_model(
    base: str, adapter: str | Path | ExpertAdapter | None = None, force: bool = False, **from_pretrained_kwargs
) -> nn.Module:
    """Load a base MoE model with a task's experts in place.

    `adapter` is an expert adapter directory (ours or a published ESFT one), a registry reference (`law`,
    `law@3`, `law@1f3a`) of an adapter trained from `base`, an `ExpertAdapter`, or a PEFT adapter directory (the
    LoRA baseline), which comes back as a `PeftModel`. `force` skips the base-fingerprint check only; keys and
    shapes are always checked, and registry entries are verified against their recorded sha256 first.
    """
    if adapter is None:
        return load_base(base, **from_pretrained_kwargs)
    if isinstance(adapter, ExpertAdapter):
        return adapter.apply(load_base(base, **from_pretrained_kwargs), force=force)
    from .training.methods import artifact_method

    directory = resolve_adapter(adapter, base)  # before loading weights: a bad reference fails fast
    method = artifact_method(directory)
    if method is None:
        raise InvalidInputError(f"{directory} is not an expert adapter: it has no {CONFIG_FILE}")
    return method.load_artifact(base, directory, force=force, **from_pretrained_kwargs)
