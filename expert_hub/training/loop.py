"""`train(config)`: one training run, top to bottom, resumable from its last checkpoint.

1. Tokenize and pack the data, and hold out the reference's split for eval loss (`batches.py`): before the
   weights load or anything is written, so that bad data or settings fail at once and leave nothing behind.
2. Load the base. The method (`methods/`, looked up by name) makes what it trains trainable; ESFT scores the task
   data and selects experts here (or reads --experts) and fingerprints the base rows it will replace.
3. Resume from the newest intact checkpoint, if any.
4. AdamW steps with gradient accumulation, on float32 master weights (`precision.py`; `--pure-bf16`: bfloat16
   as the reference) and with the router auxiliary loss if asked (`aux_loss.py`); every `save_every` steps an
   atomic checkpoint, every `eval_every` the held-out loss, and the weights of the best step so far in `best/`.
5. The best evaluated step's weights go back in (`keep="best"`, as the reference's `load_best_model_at_end`), and
   the method writes its artifact: an expert adapter (ESFT), a PEFT adapter (lora) or a full checkpoint (full).

Data order is a pure function of the seed and the step, so a resumed run sees exactly the batches an
uninterrupted one would. Launched by `torchrun` / `accelerate launch`, it trains data-parallel: each process holds
the whole model (accelerate's DDP) or, with `sharding="fsdp"`, a shard of it (`sharding.py`). Either way the loss is
the mean over every rank's target tokens, so N processes train the weights one process would.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list

from ..auto_routing import PROFILE_FILE
from ..data import load_conversations
from ..errors import ExpertHubError, InvalidInputError
from ..evaluation import example_losses
from ..io import read_json, write_json_atomic
from ..models import load_base, load_config, load_tokenizer
from .aux_loss import RouterAuxLoss
from .batches import DataOrder, batch, loss_tokens, micro_batches, packed_data
from .checkpoint import (
    DamagedCheckpointError,
    list_checkpoints,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from .config import TrainingConfig
from .methods import RunContext, TrainingMethod, get_method, trainable_parameters
from .precision import drop_float32_masters, keep_float32_masters
from .sharding import gathered, gathered_optimizer_state, gradient_sync, shard_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"


@dataclass
class StepReport:
    """What the loop tells its caller after each step (the CLI draws a progress bar from it)."""

    step: int
    steps: int
    loss: float
    tokens_per_second: float
    eval_loss: float | None = None
    aux_loss: float | None = None  # --router-aux-loss: the step's weighted auxiliary loss, not in `loss`


@dataclass
class TrainingResult:
    model: torch.nn.Module  # the trained model (ESFT: rows merged back in; under FSDP: this rank's shards, rows apart)
    artifact: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None  # of the shipped step
    seconds: float
    resumed_from: int
    shipped_step: int  # the step whose weights the artifact holds (`keep`: the best evaluated one, or the last)
    main_process: bool = True  # False on the other ranks of a data-parallel run


def train(
    config: TrainingConfig,
    on_step: Callable[[StepReport], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainingResult:
    """The run, in the order of the module's docstring: set up, resume, fit, ship."""
    run = _setup(config, on_status)
    progress = _resume(run)
    _fit(run, progress, on_step)
    return _ship(run, progress)


@dataclass
class _Run:
    """What a run sets up once and every later step uses."""

    config: TrainingConfig
    out: Path
    accelerator: Accelerator
    status: Callable[[str], None]
    tokenizer: PreTrainedTokenizerBase
    train_blocks: list
    eval_blocks: list
    model: torch.nn.Module
    method: TrainingMethod
    optimizer: torch.optim.Optimizer
    trainable: dict[str, torch.nn.Parameter]
    router_aux: RouterAuxLoss | None

    @property
    def sharded(self) -> bool:
        return self.config.sharding == "fsdp"

    @property
    def main_process(self) -> bool:
        """The process that reports and writes files."""
        return self.accelerator.is_main_process

    @property
    def evaluating(self) -> bool:
        """Under FSDP every rank evaluates: the forward gathers each layer from all of them."""
        return self.main_process or self.sharded


@dataclass
class _Progress:
    """Where the run stands: saved in every checkpoint, so a resumed run goes on from it."""

    start_step: int = 0
    elapsed: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    best: dict | None = None  # the step with the lowest eval loss so far, and that loss


def _setup(config: TrainingConfig, on_status: Callable[[str], None] | None) -> _Run:
    """Checks, the data, the base and what the method trains of it, the optimizer: steps 1 and 2."""
    out = Path(config.out)
    # Selected experts that see no token in a micro-batch get no gradient: DDP must expect unused parameters.
    # cpu=True lets torchrun / accelerate launch train data-parallel over gloo on machines without GPUs.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    config.processes = accelerator.num_processes  # the data order depends on it: a resume must match
    sharded = config.sharding == "fsdp"
    if sharded and config.processes == 1:
        raise InvalidInputError(
            "--sharding fsdp shards the model across processes: launch several with torchrun or accelerate launch"
        )
    _check_output(out, config)  # cheap checks first: bad input fails before any weights load
    for data in filter(None, (config.data, config.mix_data)):
        if next(load_conversations(data, config.split), None) is None:
            raise InvalidInputError(f"{data} holds no conversations")
    base_config = load_config(config.base, trust_remote_code=config.trust_remote_code)
    if config.router_aux_loss:
        RouterAuxLoss.check_supported(base_config)
    positions = getattr(base_config, "max_position_embeddings", None)
    if positions and config.seq_len > positions:
        raise InvalidInputError(f"--seq-len {config.seq_len} is longer than the model's {positions} positions")
    get_method(config.method).check_base(config, base_config)
    main_process = accelerator.is_main_process
    status = on_status if on_status and main_process else (lambda message: None)
    torch.manual_seed(config.seed)

    # 1. the data (no status before it: a bad setting it finds is one line, without a progress bar)
    tokenizer = load_tokenizer(config.base, trust_remote_code=config.trust_remote_code)
    train_blocks, eval_blocks = packed_data(config, tokenizer, status)

    # 2. the base model, and what the method trains of it
    status(f"Loading {config.base}")
    base = load_base(config.base, dtype=_dtype(config.dtype), trust_remote_code=config.trust_remote_code)
    if not sharded:  # sharding moves each rank's shards to its device: the whole model need not fit one
        base.to(accelerator.device)
    base.config.use_cache = False
    if main_process:
        write_json_atomic(out / CONFIG_FILE, config.to_json())  # from here on, rerunning resumes this run
    method = get_method(config.method)(config)
    model = method.prepare(base, RunContext(out, tokenizer, accelerator, status))
    if not config.pure_bf16:
        keep_float32_masters(model)
    router_aux = RouterAuxLoss(model, config.router_aux_loss_coef) if config.router_aux_loss else None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = trainable_parameters(model)
    if not trainable:
        raise InvalidInputError("nothing to train: the expert config selects no experts")
    if sharded:
        trainable = trainable_parameters(shard_model(model))  # the sharded Parameters that took their places
    optimizer = torch.optim.AdamW(param_groups(trainable, config.weight_decay), lr=config.lr, betas=config.betas)
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(
        config,
        out,
        accelerator,
        status,
        tokenizer,
        train_blocks,
        eval_blocks,
        model,
        method,
        optimizer,
        trainable,
        router_aux,
    )


def _resume(run: _Run) -> _Progress:
    """Step 3: where the newest intact checkpoint left off, or the start."""
    progress = _Progress()
    if checkpoints := list_checkpoints(run.out / "checkpoints"):
        saved = _load_newest_intact(checkpoints, run.trainable, run.optimizer, run.status)
        progress = _Progress(saved["step"], saved.get("seconds", 0.0), saved.get("loss"), None, saved.get("best"))
        if progress.start_step > run.config.steps:
            raise InvalidInputError(
                f"{run.out} already holds step {progress.start_step}; ask for --steps {progress.start_step} or more"
            )
        run.status(f"Resuming from step {progress.start_step}")
    if run.main_process:
        _truncate_log(run.out / LOG_FILE, progress.start_step)
    return progress


def _fit(run: _Run, progress: _Progress, on_step: Callable[[StepReport], None] | None) -> None:
    """Step 4: the steps, each followed by what its number asks for (eval, best weights, checkpoint, report)."""
    config, accelerator = run.config, run.accelerator
    order = DataOrder(len(run.train_blocks), config.seed)
    for step in range(progress.start_step, config.steps):
        started = time.perf_counter()
        progress.train_loss, aux_loss = _step(run, partial(micro_batches, step, config, accelerator, order))
        if not math.isfinite(progress.train_loss):
            precision = "drop --pure-bf16" if config.pure_bf16 else "use --dtype float32"
            raise ExpertHubError(f"the loss became {progress.train_loss} at step {step + 1}; lower --lr or {precision}")
        seconds = time.perf_counter() - started
        progress.elapsed += seconds
        done = step + 1
        if run.evaluating and run.eval_blocks and (done % config.eval_every == 0 or done == config.steps):
            _evaluate(run, progress, done)
        tokens_per_second = config.grad_accumulation * config.batch_size * config.seq_len / seconds
        report = StepReport(done, config.steps, progress.train_loss, tokens_per_second, progress.eval_loss, aux_loss)
        if run.main_process:
            _append_log(run.out / LOG_FILE, report)
        if done % config.save_every == 0 or done == config.steps:
            weights, optimizer_state = gathered(run.trainable), gathered_optimizer_state(run.optimizer)
            if run.main_process:
                saved = {"seconds": progress.elapsed, "loss": progress.train_loss, "best": progress.best}
                save_checkpoint(run.out / "checkpoints", done, weights, optimizer_state, saved, config.keep_checkpoints)
        if run.main_process and on_step:
            on_step(report)
        accelerator.wait_for_everyone()


def _evaluate(run: _Run, progress: _Progress, done: int) -> None:
    """The held-out loss after step `done`; a new lowest one keeps its weights in `best/` (`keep="best"`)."""
    progress.eval_loss = _eval_loss(run.model, run.eval_blocks, run.config, run.accelerator)
    if progress.best is None or progress.eval_loss < progress.best["eval_loss"]:
        progress.best = {"step": done, "eval_loss": progress.eval_loss}
        if run.config.keep == "best":
            weights = gathered(run.trainable)  # collective under FSDP: before the main process's test
            if run.main_process:
                save_best(run.out / "best", weights, progress.best)


def _ship(run: _Run, progress: _Progress) -> TrainingResult:
    """Step 5: the artifact, from the best evaluated step (or the last)."""
    config, accelerator = run.config, run.accelerator
    model = accelerator.unwrap_model(run.model)
    if run.evaluating and run.eval_blocks and progress.eval_loss is None:
        progress.eval_loss = _eval_loss(model, run.eval_blocks, config, accelerator)
    shipped: dict = {"step": config.steps, "eval_loss": progress.eval_loss}
    best = progress.best
    if run.evaluating and config.keep == "best" and best is not None and best["step"] != config.steps:
        run.status(f"Shipping step {best['step']}, the lowest eval loss ({best['eval_loss']:.4f})")
        load_best(run.out / "best", run.trainable, best)
        shipped = best
    if run.router_aux:
        run.router_aux.remove()
    if run.sharded:  # the fused tensors are sharded: the artifact is made from the gathered trainable tensors
        model.reshard()  # the root's own parameters stay gathered after a forward; the result holds shards only
        weights = gathered(run.trainable)
    else:
        drop_float32_masters(model)
        model = run.method.finish(model)
    model.config.use_cache = True
    artifact = run.out / run.method.artifact_name
    if run.main_process:
        run.status(f"Writing {artifact}")
        summary = {
            "steps": config.steps,
            "shipped_step": shipped["step"],
            "train_loss": progress.train_loss,
            "eval_loss": shipped["eval_loss"],
            "seconds": round(progress.elapsed, 3),
            "train_blocks": len(run.train_blocks),
            "eval_blocks": len(run.eval_blocks),
        }
        metadata = run.method.artifact_metadata(summary)
        if run.sharded:
            run.method.write_sharded_artifact(model, weights, artifact, metadata)
        else:
            run.method.write_artifact(model, artifact, run.tokenizer, metadata)
    accelerator.wait_for_everyone()
    return TrainingResult(
        model,
        artifact,
        config.steps,
        progress.train_loss,
        shipped["eval_loss"],
        progress.elapsed,
        progress.start_step,
        shipped["step"],
        run.main_process,
    )


def _step(run: _Run, micro_batches: Callable[[], Iterator[list[int]]]) -> tuple[float, float | None]:
    """One optimizer step over the micro-batches (`micro_batches()` yields each one's block indices); returns the
    mean loss per target token and the summed auxiliary loss of the micro-batches (None without --router-aux-loss)."""
    model, blocks, config, accelerator, router_aux = (
        run.model,
        run.train_blocks,
        run.config,
        run.accelerator,
        run.router_aux,
    )
    model.train()
    # Summed over tokens and divided by the step's token count on all ranks: micro-batches and ranks add up to the
    # step's mean, as one process computes it. The gradient reduction averages over ranks, hence `* processes`.
    local_tokens = torch.tensor(sum(loss_tokens(blocks[i]) for indices in micro_batches() for i in indices))
    target_tokens = max(int(accelerator.reduce(local_tokens.to(accelerator.device), reduction="sum")), 1)
    # floats until the first micro-batch adds its loss tensor
    total: float | torch.Tensor = 0.0
    aux_total: float | torch.Tensor = 0.0
    for micro, indices in enumerate(micro_batches()):
        input_ids, labels = batch(blocks, indices, accelerator.device)
        with gradient_sync(model, micro == config.grad_accumulation - 1, accelerator):  # once per step, after the last
            inputs = dict(input_ids=input_ids, labels=labels, num_items_in_batch=target_tokens)
            with _autocast(config, accelerator):
                if router_aux:
                    loss, aux_loss = router_aux.losses(model, **inputs)
                    aux_total += aux_loss.detach()
                    loss_to_train = loss * accelerator.num_processes + aux_loss  # each rank's aux loss is whole
                else:
                    loss = model(**inputs).loss
                    loss_to_train = loss * accelerator.num_processes
            accelerator.backward(loss_to_train)
        total += loss.detach()
    accelerator.clip_grad_norm_(list(run.trainable.values()), config.clip_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    mean_loss = accelerator.reduce(total, reduction="sum").item()  # the same figure on every rank
    return mean_loss, accelerator.reduce(aux_total, reduction="mean").item() if router_aux else None


def _eval_loss(model, blocks, config: TrainingConfig, accelerator) -> float:
    """The held-out loss as the reference's Trainer measures it with its evaluation batches of 1: the mean of each
    block's loss per target token, so every block weighs the same however many answer tokens it holds (a mean
    over all the tokens would rank steps differently). Under FSDP every rank computes it (the forward is
    collective) and all take rank 0's, so their decisions about the best step cannot drift apart."""
    with _autocast(config, accelerator):
        losses = example_losses(accelerator.unwrap_model(model), blocks, config.batch_size)
    value = sum(total / tokens for total, tokens in losses) / len(losses)
    return broadcast_object_list([value])[0] if config.sharding == "fsdp" else value


def _autocast(config: TrainingConfig, accelerator):
    """--pure-bf16 runs the forward as the reference's Trainer does with `bf16=True`: under bfloat16 autocast."""
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=config.pure_bf16)


def _load_newest_intact(checkpoints: list[Path], trainable, optimizer, status) -> dict:
    """Resume from the newest checkpoint that is whole; a damaged one (a disk error, an edit) is skipped, loudly."""
    damaged = []
    for path in reversed(checkpoints):
        try:
            return load_checkpoint(path, trainable, optimizer)
        except DamagedCheckpointError as error:
            damaged.append(str(error))
            status(f"warning: {error}; trying the checkpoint before it")
    raise InvalidInputError(
        f"no checkpoint in {checkpoints[0].parent} can be resumed ({'; '.join(damaged)}); "
        "remove them to start over, or use a new --out"
    )


def _check_output(out: Path, config: TrainingConfig) -> None:
    """`out` is new, or holds this very run (which then resumes)."""
    saved = out / CONFIG_FILE
    if saved.is_file():
        config.check_resumable_from(read_json(saved), str(out))
    elif out.exists() and any(
        path.name not in ("expert_cfg.json", "scores.json", PROFILE_FILE) for path in out.iterdir()
    ):
        raise InvalidInputError(f"{out} is not empty and holds no expert-hub run; choose another --out")


def param_groups(trainable: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay weights, not biases or norms (as the reference's Hugging Face Trainer does); the demo base's
    pretraining recipe groups its parameters with this too."""
    exempt = {name for name, p in trainable.items() if "bias" in name or "norm" in name.lower() or p.ndim < 2}
    decay = [p for name, p in trainable.items() if name not in exempt]
    no_decay = [p for name, p in trainable.items() if name in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _append_log(path: Path, report: StepReport) -> None:
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(asdict(report)) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """After a resume, forget log lines of steps that will run again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(f"{line}\n" for line in kept))
