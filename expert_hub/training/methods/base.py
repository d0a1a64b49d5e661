"""`TrainingMethod`: one way to train a base model, and the registry that finds methods by name.

A method says what it makes trainable (`prepare`), what it does once the last step ran (`finish`), its default
learning rate, the artifact it writes (`write_artifact`) and how that artifact loads back onto a base
(`load_artifact`, for directories holding its `artifact_file`). The loop, the config, the CLI and `load_model`
ask the registry rather than comparing method names, so a new method is one module with a registered class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, cast

from torch import Tensor, nn

from ...adapter import METADATA_FILE, AdapterMetadata
from ...errors import InvalidInputError
from ...io import atomic_directory, write_json_atomic

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from ..config import TrainingConfig

    # What a method trains (`prepare`): the base model itself, or a PEFT model around it (LoRA).
    TrainedModel: TypeAlias = PreTrainedModel | PeftModel


@dataclass
class RunContext:
    """What a method may need from the run while it prepares the model."""

    out: Path  # the run directory (methods may keep files there that a resume reuses)
    tokenizer: Any
    accelerator: Any  # accelerate's Accelerator: the process layout of a data-parallel run
    status: Callable[[str], None]


class TrainingMethod(ABC):
    """Base class; one instance per run, built from the run's config."""

    name: ClassVar[str]
    default_learning_rate: ClassVar[float] = 1e-5  # the reference's, for ESFT and full fine-tuning
    artifact_name: ClassVar[str] = "adapter"  # the artifact's directory inside the run directory
    artifact_file: ClassVar[str | None] = None  # the file that marks a directory as this method's artifact
    ships_expert_adapter: ClassVar[bool] = False  # the artifact is an expert adapter the registry keeps
    shardable: ClassVar[bool] = False  # trains under --sharding fsdp (it implements `write_sharded_artifact`)

    def __init__(self, config: TrainingConfig):
        self.config = config

    @classmethod
    def check_config(cls, config: TrainingConfig) -> None:
        """Refuse settings this method cannot use (called when the config is made)."""
        if config.experts:
            raise InvalidInputError("--experts only applies to --method esft")

    @classmethod  # noqa: B027 (a hook that most methods leave empty)
    def check_base(cls, config: TrainingConfig, base_config) -> None:
        """Refuse settings this base model cannot take (called with its config, before its weights load or
        anything is written)."""

    @abstractmethod
    def prepare(self, model: PreTrainedModel, run: RunContext) -> TrainedModel:
        """Make what the method trains trainable and the rest frozen; returns the model to train."""

    def finish(self, model: nn.Module) -> nn.Module:
        """The trained model in the form its artifact is written from."""
        return model

    def artifact_metadata(self, summary: dict) -> dict:
        """`expert_hub.json` fields for the artifact; `summary` holds the run's steps, losses and time."""
        return dict(
            task=self.config.task,
            method=self.config.method,
            score_function=None,
            top_p=None,
            base_model=self.config.base,
            metrics={key: summary[key] for key in ("train_loss", "eval_loss") if summary.get(key) is not None},
            training={"config": self.config.to_json(), **summary},
        )

    @abstractmethod
    def write_artifact(self, model: nn.Module, path: Path, tokenizer, metadata: dict) -> Path:
        """Write the artifact atomically (readers see no directory or a whole one)."""

    def write_sharded_artifact(self, model: nn.Module, trained: dict[str, Tensor], path: Path, metadata: dict) -> Path:
        """Under --sharding fsdp: write the artifact from `trained`, the full tensors of the trainable parameters by
        name (gathered from every rank), since `model` holds only this rank's shards (methods that are `shardable`)."""
        raise NotImplementedError(f"{self.name} does not train under --sharding fsdp")

    @classmethod
    def load_artifact(cls, base: str, directory: Path, force: bool = False, **from_pretrained_kwargs) -> nn.Module:
        """`base` with this method's artifact in `directory` applied (methods that set `artifact_file`)."""
        raise NotImplementedError(f"{cls.name} sets artifact_file but does not say how its artifact loads")


def write_model_directory(model: nn.Module, path: Path, metadata: dict, tokenizer=None) -> Path:
    """`save_pretrained` (a PEFT adapter or a whole model) with the same `expert_hub.json` an expert adapter has."""
    with atomic_directory(path, overwrite=True) as staging:
        # a transformers or a PEFT model, whose method nn.Module types as Tensor | Module
        cast(Callable[[Path], None], model.save_pretrained)(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json_atomic(staging / METADATA_FILE, asdict(AdapterMetadata(**metadata)))
    return path


def disable_router_aux_loss(model: PreTrainedModel) -> None:
    """The load-balancing loss would train the router; every method keeps routing as the base model does."""
    model.config.output_router_logits = False


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


_METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(method: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: make a method available by its `name` (to `--method`, the config and `load_model`)."""
    if method.name in _METHODS:
        raise ValueError(f"a training method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> type[TrainingMethod]:
    if name not in _METHODS:
        raise InvalidInputError(f"unknown method {name!r}; use one of {', '.join(_METHODS)}")
    return _METHODS[name]


def artifact_method(directory: Path) -> type[TrainingMethod] | None:
    """The method whose artifact `directory` is, judged by its marker file; None when no method's.

    Methods are asked in registration order, ESFT first: a directory with both `expert_cfg.json` and
    `adapter_config.json` is an expert adapter.
    """
    return next(
        (
            method
            for method in _METHODS.values()
            if method.artifact_file and (directory / method.artifact_file).is_file()
        ),
        None,
    )
