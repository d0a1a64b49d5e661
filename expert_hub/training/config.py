"""`TrainingConfig`: every setting of a training run, each declared once, with the reference repo's defaults.

A field's metadata (`setting(...)`) carries its help text, its command-line flag and bounds, and whether a base
model may ship its own default for it (`training_defaults` in `expert_hub_base.json`, as the demo base does):
`expert-hub train` builds its options from these fields, so a new option is one new field.

The config is written into the output directory when a run starts; a later run on the same directory must ask
for the same thing (only `steps` and the checkpoint cadence may change) so resuming can never mix two runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import cast

from ..errors import InvalidInputError
from ..routing import DEFAULT_SCORE_TOKENS, DEFAULT_SEED
from ..selection import DEFAULT_TOP_P
from ..settings import DTYPES, field_default, setting
from .methods import get_method, method_names

# Fields a resumed run may change without changing what is being trained.
RESUMABLE_CHANGES = frozenset({"out", "steps", "save_every", "eval_every", "keep_checkpoints", "keep"})
# The paper mixes 1 general conversation per task one. Mixed-in examples are held in memory, so an absurd ratio
# (1e9) would ask for terabytes; 100 is far beyond any use and still the size of the data, not of the machine.
MAX_MIX_RATIO = 100.0
# How a run packs and splits its data and measures eval loss. 2: the reference's held-out split (the permutation's
# tail), its eval loss (a mean over blocks) and packing (a BOS dropped only from examples that have one). A run
# started under another format (1: before the format was recorded) is refused on resume rather than mixed.
RUN_FORMAT = 2


def _default_lr_help() -> str:
    by_rate: dict[float, list[str]] = {}
    for name in method_names():
        by_rate.setdefault(get_method(name).default_learning_rate, []).append(name)
    return ", ".join(f"{_scientific(rate)} ({', '.join(names)})" for rate, names in by_rate.items())


def _scientific(value: float) -> str:
    """1e-05 -> 1e-5, as learning rates are written."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class TrainingConfig:
    """A training run. Defaults follow the reference ESFT training config (`configs/base.yaml`)."""

    task: str = setting(help="Task name, e.g. law; names the output and the adapter.", cli=False)
    base: str = setting(help="Base MoE model: a local directory or a Hub id.", cli=False)
    data: str = setting(help="Training data: JSONL conversations or a Hugging Face dataset.", cli=False)
    out: str = setting(help="Output directory; rerunning on it resumes.", cli=False)
    method: str = setting(
        "esft-token",
        choices=tuple(method_names()),
        help="esft-token / esft-gate (score, select, train), esft (with --experts), or the baselines full / lora.",
    )
    experts: str | None = setting(None, path=True, help="expert_cfg.json for --method esft.")
    split: str = setting("train", help="Split of a Hugging Face dataset.")
    mix_data: str | None = setting(
        None,
        path=True,
        help="General data mixed into the training data (same formats as the task data), as the paper's main "
        "results mix alignment data in; never scored for the expert selection.",
    )
    mix_ratio: float = setting(
        1.0,
        min=0,
        max=MAX_MIX_RATIO,
        help="Mixed-in conversations per task conversation (the paper: 1.0), drawn with --seed.",
    )
    chat_template: bool = setting(
        False,
        flags=("--chat-template",),
        help="Use the tokenizer's chat template instead of the reference `User: …\\n\\nAssistant:` format.",
    )
    # ESFT selection (esft-token / esft-gate): score this many task tokens, then select with top-p
    score_tokens: int = setting(
        DEFAULT_SCORE_TOKENS,
        min=1,
        base_default=True,
        help="Task tokens scored to select experts (esft-token / esft-gate).",
    )
    top_p: float | None = setting(
        None,
        base_default=True,
        help="Selection threshold.",
        default_help=" / ".join(f"{p:g} ({by})" for by, p in DEFAULT_TOP_P.items()),
    )
    # LoRA baseline (paper: rank 8 on every linear layer but embeddings and lm_head)
    lora_rank: int = setting(8, min=1, help="LoRA rank.")
    lora_alpha: int = setting(16, min=1, help="LoRA alpha.")
    lora_targets: list[str] = setting(
        default_factory=lambda: ["all-linear"],
        default_help="all-linear",
        help="Comma-separated LoRA target modules ('all-linear': the attention projections and other linear layers, "
        "not lm_head, the routers, the routed experts or MLP projections that PEFT would redirect to the routed "
        "experts).",
    )
    lora_experts: bool = setting(
        True, help="Also put LoRA on the fused routed-expert tensors (gate_up_proj, down_proj); routers never get LoRA."
    )
    # optimisation
    steps: int = setting(500, min=1, base_default=True, help="Optimizer steps.")
    batch_size: int = setting(1, min=1, base_default=True, help="Packed sequences per micro-batch.")
    grad_accumulation: int = setting(16, min=1, base_default=True, help="Micro-batches per optimizer step.")
    seq_len: int = setting(4096, min=8, base_default=True, help="Packed sequence length.")
    learning_rate: float | None = setting(
        None, flags=("--lr",), base_default=True, help="Learning rate.", default_help=_default_lr_help()
    )
    betas: tuple[float, float] = setting((0.9, 0.95), flags=("--beta1", "--beta2"), help="AdamW beta{n}.")
    weight_decay: float = setting(0.1, min=0, help="AdamW weight decay.")
    clip_grad_norm: float = setting(1.0, help="Gradient-norm clip (above 0).")
    random_concat_ratio: float = setting(
        0.2, min=0, max=1, help="Chance a packed example drops its BOS (reference packing)."
    )
    eval_fraction: float = setting(0.02, min=0, max=0.99, help="Share of packed sequences held out for eval loss.")
    dtype: str = setting(
        "auto",
        choices=DTYPES,
        help="Weights dtype; auto = bfloat16 on GPUs that support it, else float32 (what trains keeps float32 "
        "master weights unless --pure-bf16).",
    )
    pure_bf16: bool = setting(
        False,
        flags=("--pure-bf16",),
        help="Train as the reference does: bfloat16 weights, gradients and AdamW state under bfloat16 autocast "
        "(default: every method keeps float32 master weights for what it trains and computes in --dtype).",
    )
    router_aux_loss: bool = setting(
        False,
        flags=("--router-aux-loss",),
        help="Add the model's own router auxiliary (load-balancing) loss to the training loss, as the reference "
        "does (DeepSeek-V2: its sequence-level loss; Qwen-MoE, OLMoE, Mixtral, gpt-oss: transformers' loss).",
    )
    router_aux_loss_coef: float | None = setting(
        None,
        min=0,
        help="Weight of --router-aux-loss.",
        default_help="the model config's aux_loss_alpha / router_aux_loss_coef",
    )
    gradient_checkpointing: bool = setting(
        True, base_default=True, default_help="on", help="Recompute activations in backward to save memory."
    )
    seed: int = setting(
        DEFAULT_SEED, help="Seed for the scored sample, packing, data order and initialisation (the reference's)."
    )
    # checkpoints and evaluation
    save_every: int = setting(100, min=1, base_default=True, help="Checkpoint every N steps.")
    eval_every: int = setting(100, min=1, base_default=True, help="Eval loss every N steps.")
    keep_checkpoints: int = setting(2, min=1, help="Checkpoints kept.")
    keep: str = setting(
        "best",
        choices=("best", "last"),
        help="The step whose weights are shipped: best = the lowest held-out loss of the evaluated steps (as the "
        "reference does), last = the final step.",
    )
    trust_remote_code: bool = setting(False, help="Run the model repo's own code (only if you trust it).")
    sharding: str = setting(
        "ddp",
        choices=("ddp", "fsdp"),
        help="How several processes (torchrun / accelerate launch) share the model: ddp = a whole copy each; fsdp = "
        "the base, the trained rows and their optimizer state sharded across them (FSDP2), for a base that does not "
        "fit one device (ESFT methods only).",
    )
    # data-parallel processes; set by the loop, recorded because the data order depends on it
    processes: int = setting(1, help="Data-parallel processes (set by the loop).", cli=False)
    run_format: int = setting(RUN_FORMAT, help="How the data is packed and split (`RUN_FORMAT`).", cli=False)

    def __post_init__(self) -> None:
        self.betas = cast(tuple[float, float], tuple(self.betas))  # the two betas as given (JSON gives a list)
        get_method(self.method).check_config(self)  # an unknown method is refused here
        if self.sharding == "fsdp" and not get_method(self.method).shardable:
            raise InvalidInputError(
                f"--sharding fsdp trains the ESFT methods only; train --method {self.method} with --sharding ddp"
            )
        if self.dtype == "float16":
            raise InvalidInputError("training in float16 overflows; use --dtype bfloat16 or float32")
        if self.pure_bf16:
            if self.dtype not in ("auto", "bfloat16"):
                raise InvalidInputError(f"--pure-bf16 trains bfloat16 weights; it cannot use --dtype {self.dtype}")
            self.dtype = "bfloat16"
        if self.router_aux_loss_coef is not None:
            if not self.router_aux_loss:
                raise InvalidInputError("--router-aux-loss-coef needs --router-aux-loss")
            if not (math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
                raise InvalidInputError(f"--router-aux-loss-coef must be 0 or more, got {self.router_aux_loss_coef}")
        # every comparison is written so that NaN fails it
        if not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise InvalidInputError(f"--clip-grad-norm must be above 0, got {self.clip_grad_norm}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidInputError(f"--lr must be above 0, got {self.learning_rate}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise InvalidInputError(f"--beta1 and --beta2 must be in [0, 1), got {', '.join(map(str, self.betas))}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidInputError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.mix_ratio <= MAX_MIX_RATIO:
            raise InvalidInputError(f"--mix-ratio must be in [0, {MAX_MIX_RATIO:g}], got {self.mix_ratio}")
        if not 0 <= self.random_concat_ratio <= 1:
            raise InvalidInputError(f"--random-concat-ratio must be in [0, 1], got {self.random_concat_ratio}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidInputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.eval_fraction < 1:
            raise InvalidInputError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        for name in (
            "steps",
            "batch_size",
            "grad_accumulation",
            "seq_len",
            "save_every",
            "eval_every",
            "keep_checkpoints",
            "lora_rank",
        ):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return get_method(self.method).default_learning_rate

    def to_json(self) -> dict:
        return asdict(self)

    def check_resumable_from(self, saved: dict, out: str) -> None:
        """Refuse to resume a run in `out` that was started with different settings."""
        if (started := saved.get("run_format", 1)) != self.run_format:
            raise InvalidInputError(
                f"{out} holds a run started by another version of expert-hub, which packs and holds out other "
                f"blocks (run format {started}, this one {self.run_format}); use a new --out to start over"
            )
        current = self.to_json()
        # a setting added since the run started was, in effect, at its default then
        saved = {f.name: field_default(f) for f in fields(self) if f.name not in saved} | saved
        changed = [key for key in current if key not in RESUMABLE_CHANGES and _norm(saved[key]) != _norm(current[key])]
        if changed:
            details = ", ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed)
            raise InvalidInputError(f"{out} holds a run with other settings ({details}); use a new --out to start over")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def base_settings() -> tuple[str, ...]:
    """The settings a base may give its own defaults for (`training_defaults` in `expert_hub_base.json`)."""
    return tuple(f.name for f in fields(TrainingConfig) if f.metadata["base_default"])


def base_training_defaults(base: str) -> dict:
    """The training defaults a local base ships in `expert_hub_base.json`, or {}.

    The demo base ships some so that it learns a task in minutes on a CPU; the general defaults stay the
    reference's.
    """
    from ..models import base_metadata

    defaults = base_metadata(base).get("training_defaults", {})
    if not isinstance(defaults, dict) or not set(defaults) <= set(base_settings()):
        raise InvalidInputError(
            f"{base}: expert_hub_base.json's training_defaults may only set {', '.join(base_settings())}"
        )
    return defaults
