"""`TrainingConfig`: every knob of a training run, with the reference repo's defaults.

The config is written into the output directory when a run starts; a later run on the same directory must ask
for the same thing (only `steps` may grow) so resuming can never mix two different runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..errors import InvalidInputError

Method = Literal["esft-token", "esft-gate", "esft", "full", "lora"]
METHODS: tuple[str, ...] = ("esft-token", "esft-gate", "esft", "full", "lora")
ESFT_METHODS = ("esft-token", "esft-gate", "esft")

# Fields a resumed run may change without changing what is being trained.
RESUMABLE_CHANGES = frozenset({"out", "steps", "save_every", "eval_every", "keep_checkpoints"})


@dataclass
class TrainingConfig:
    """A training run. Defaults follow the reference ESFT training config."""

    task: str
    base: str
    data: str
    out: str
    method: Method = "esft-token"
    experts: str | None = None  # expert_cfg.json for method "esft"
    split: str = "train"  # split of a Hugging Face dataset
    chat_template: bool = False
    # ESFT selection (esft-token / esft-gate): score this many task tokens, then select with top-p
    score_tokens: int = 131072
    top_p: float | None = None  # None: 0.2 for token scores, 0.1 for gate scores
    # LoRA baseline (paper: rank 8 on every linear layer but embeddings and lm_head)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_experts: bool = True  # also put LoRA on the fused expert tensors
    # optimisation
    steps: int = 500
    batch_size: int = 1
    grad_accumulation: int = 16
    seq_len: int = 4096
    learning_rate: float | None = None  # None: 1e-5 (ESFT, full), 1e-4 (LoRA)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    clip_grad_norm: float = 1.0
    random_concat_ratio: float = 0.2
    eval_fraction: float = 0.02
    dtype: str = "auto"  # auto: bfloat16 where the hardware supports it, else float32
    gradient_checkpointing: bool = True
    seed: int = 5934875
    # checkpoints and evaluation
    save_every: int = 100
    eval_every: int = 100
    keep_checkpoints: int = 2
    trust_remote_code: bool = False
    processes: int = 1  # data-parallel processes; set by the loop, recorded because the data order depends on it

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "esft" and not self.experts:
            raise InvalidInputError("--method esft needs --experts EXPERT_CFG.json (or use esft-token / esft-gate)")
        if self.experts and self.method != "esft":
            raise InvalidInputError("--experts only applies to --method esft")
        if self.dtype == "float16":
            raise InvalidInputError("training in float16 overflows; use --dtype bfloat16 or float32")
        # every comparison is written so that NaN fails it
        if not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise InvalidInputError(f"--clip-grad-norm must be above 0, got {self.clip_grad_norm}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidInputError(f"--lr must be above 0, got {self.learning_rate}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise InvalidInputError(f"--beta1 and --beta2 must be in [0, 1), got {', '.join(map(str, self.betas))}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidInputError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.random_concat_ratio <= 1:
            raise InvalidInputError(f"--random-concat-ratio must be in [0, 1], got {self.random_concat_ratio}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidInputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.eval_fraction < 1:
            raise InvalidInputError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("steps", "batch_size", "grad_accumulation", "seq_len", "save_every", "eval_every",
                     "keep_checkpoints", "lora_rank"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.method == "lora" else 1e-5

    @property
    def score_function(self) -> str | None:
        return {"esft-token": "token", "esft-gate": "gate"}.get(self.method)

    def to_json(self) -> dict:
        return asdict(self)

    def check_resumable_from(self, saved: dict, out: str) -> None:
        """Refuse to resume a run in `out` that was started with different settings."""
        current = self.to_json()
        changed = [key for key in current if key not in RESUMABLE_CHANGES and _norm(saved.get(key)) != _norm(current[key])]
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed)
            raise InvalidInputError(f"{out} holds a run with other settings ({details}); use a new --out to start over")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value
