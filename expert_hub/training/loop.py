"""`train(config)`: one training run, top to bottom, resumable from its last checkpoint.

1. Tokenize and pack the data, and hold out the reference's split for eval loss: before the weights load or
   anything is written, so that bad data or settings fail at once and leave nothing behind.
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
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list

from ..auto_routing import PROFILE_FILE
from ..data import IGNORE_INDEX, load_conversations, pack, pad_token_id, tokenize_conversation
from ..errors import ExpertHubError, InvalidInputError
from ..evaluation import example_losses
from ..io import read_json, write_json_atomic
from ..models import load_base, load_config, load_tokenizer
from .aux_loss import RouterAuxLoss
from .checkpoint import (
    DamagedCheckpointError,
    list_checkpoints,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from .config import TrainingConfig
from .methods import RunContext, get_method, trainable_parameters
from .precision import drop_float32_masters, keep_float32_masters
from .sharding import gathered, gathered_optimizer_state, gradient_sync, shard_model

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
    main_process = accelerator.is_main_process  # the one that reports and writes files
    status = on_status if on_status and main_process else (lambda message: None)
    torch.manual_seed(config.seed)

    # 1. the data (no status before it: a bad setting it finds is one line, without a progress bar)
    tokenizer = load_tokenizer(config.base, trust_remote_code=config.trust_remote_code)
    train_blocks, eval_blocks = _packed_data(config, tokenizer, status)

    # 2. the base model, and what the method trains of it
    status(f"Loading {config.base}")
    model = load_base(config.base, dtype=_dtype(config.dtype), trust_remote_code=config.trust_remote_code)
    if not sharded:  # sharding moves each rank's shards to its device: the whole model need not fit one
        model.to(accelerator.device)
    model.config.use_cache = False
    if main_process:
        write_json_atomic(out / CONFIG_FILE, config.to_json())  # from here on, rerunning resumes this run
    method = get_method(config.method)(config)
    model = method.prepare(model, RunContext(out, tokenizer, accelerator, status))
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
    optimizer = torch.optim.AdamW(_param_groups(trainable, config.weight_decay), lr=config.lr, betas=config.betas)
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)

    # 3. resume where the last checkpoint left off
    start_step, elapsed, train_loss, best = 0, 0.0, None, None
    if checkpoints := list_checkpoints(out / "checkpoints"):
        progress = _load_newest_intact(checkpoints, trainable, optimizer, status)
        start_step, elapsed, train_loss = progress["step"], progress.get("seconds", 0.0), progress.get("loss")
        best = progress.get("best")  # the step with the lowest eval loss up to the checkpoint
        if start_step > config.steps:
            raise InvalidInputError(f"{out} already holds step {start_step}; ask for --steps {start_step} or more")
        status(f"Resuming from step {start_step}")
    if main_process:
        _truncate_log(out / LOG_FILE, start_step)

    # 4. the steps (under FSDP every rank evaluates: the forward gathers each layer from all of them)
    evaluating = main_process or sharded
    order = _DataOrder(len(train_blocks), config.seed)
    eval_loss = None
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        micro_batches = partial(_micro_batches, step, config, accelerator, order)
        train_loss, aux_loss = _step(
            model, optimizer, train_blocks, micro_batches, trainable, config, accelerator, router_aux
        )
        if not math.isfinite(train_loss):
            precision = "drop --pure-bf16" if config.pure_bf16 else "use --dtype float32"
            raise ExpertHubError(f"the loss became {train_loss} at step {step + 1}; lower --lr or {precision}")
        seconds = time.perf_counter() - started
        elapsed += seconds
        done = step + 1
        if evaluating and eval_blocks and (done % config.eval_every == 0 or done == config.steps):
            eval_loss = _eval_loss(model, eval_blocks, config, accelerator)
            if best is None or eval_loss < best["eval_loss"]:
                best = {"step": done, "eval_loss": eval_loss}
                if config.keep == "best":
                    weights = gathered(trainable)  # collective under FSDP: before the main process's test
                    if main_process:
                        save_best(out / "best", weights, best)
        tokens_per_second = config.grad_accumulation * config.batch_size * config.seq_len / seconds
        report = StepReport(done, config.steps, train_loss, tokens_per_second, eval_loss, aux_loss)
        if main_process:
            _append_log(out / LOG_FILE, report)
        if done % config.save_every == 0 or done == config.steps:
            weights, optimizer_state = gathered(trainable), gathered_optimizer_state(optimizer)
            if main_process:
                progress = {"seconds": elapsed, "loss": train_loss, "best": best}
                save_checkpoint(out / "checkpoints", done, weights, optimizer_state, progress, config.keep_checkpoints)
        if main_process and on_step:
            on_step(report)
        accelerator.wait_for_everyone()

    # 5. the artifact, from the best evaluated step (or the last)
    model = accelerator.unwrap_model(model)
    if evaluating and eval_blocks and eval_loss is None:
        eval_loss = _eval_loss(model, eval_blocks, config, accelerator)
    shipped = {"step": config.steps, "eval_loss": eval_loss}
    if evaluating and config.keep == "best" and best is not None and best["step"] != config.steps:
        status(f"Shipping step {best['step']}, the lowest eval loss ({best['eval_loss']:.4f})")
        load_best(out / "best", trainable, best)
        shipped = best
    if router_aux:
        router_aux.remove()
    if sharded:  # the fused tensors are sharded: the artifact is made from the gathered trainable tensors
        model.reshard()  # the root's own parameters stay gathered after a forward; the result holds shards only
        weights = gathered(trainable)
    else:
        drop_float32_masters(model)
        model = method.finish(model)
    model.config.use_cache = True
    artifact = out / method.artifact_name
    if main_process:
        status(f"Writing {artifact}")
        summary = {
            "steps": config.steps,
            "shipped_step": shipped["step"],
            "train_loss": train_loss,
            "eval_loss": shipped["eval_loss"],
            "seconds": round(elapsed, 3),
            "train_blocks": len(train_blocks),
            "eval_blocks": len(eval_blocks),
        }
        if sharded:
            method.write_sharded_artifact(model, weights, artifact, method.artifact_metadata(summary))
        else:
            method.write_artifact(model, artifact, tokenizer, method.artifact_metadata(summary))
    accelerator.wait_for_everyone()
    return TrainingResult(
        model,
        artifact,
        config.steps,
        train_loss,
        shipped["eval_loss"],
        elapsed,
        start_step,
        shipped["step"],
        main_process,
    )


def _micro_batches(step: int, config: TrainingConfig, accelerator, order: _DataOrder) -> Iterator[list[int]]:
    """The block indices of this rank's micro-batches of `step`, one at a time, so that --grad-accumulation sizes
    no memory: micro-batch m of the step is sample block `(step * micro-batches + m) * processes + rank`."""
    for micro in range(config.grad_accumulation):
        position = (step * config.grad_accumulation + micro) * accelerator.num_processes + accelerator.process_index
        yield order.take(position * config.batch_size, config.batch_size)


def _step(
    model,
    optimizer,
    blocks,
    micro_batches: Callable[[], Iterator[list[int]]],
    trainable,
    config: TrainingConfig,
    accelerator,
    router_aux: RouterAuxLoss | None,
) -> tuple[float, float | None]:
    """One optimizer step over the micro-batches (`micro_batches()` yields each one's block indices); returns the
    mean loss per target token and the summed auxiliary loss of the micro-batches (None without --router-aux-loss)."""
    model.train()
    # Summed over tokens and divided by the step's token count on all ranks: micro-batches and ranks add up to the
    # step's mean, as one process computes it. The gradient reduction averages over ranks, hence `* processes`.
    local_tokens = torch.tensor(sum(_targets(blocks[i]) for indices in micro_batches() for i in indices))
    target_tokens = max(int(accelerator.reduce(local_tokens.to(accelerator.device), reduction="sum")), 1)
    total, aux_total = 0.0, 0.0
    for micro, indices in enumerate(micro_batches()):
        input_ids, labels = _batch(blocks, indices, accelerator.device)
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
    accelerator.clip_grad_norm_(list(trainable.values()), config.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
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


def _packed_data(config: TrainingConfig, tokenizer, status: Callable[[str], None]) -> tuple[list, list]:
    """The training blocks and the held-out blocks that eval loss is measured on.

    The split is the reference's `random_split(blocks, [int(n * 0.98), n - int(n * 0.98)])` after
    `torch.manual_seed(seed)`, with 0.98 = 1 - --eval-fraction: one seeded permutation of the n blocks, whose
    head trains and whose tail is held out, so a run holds out the very blocks the reference holds out. Held-out
    blocks without a target token (padding alone) are left out of eval loss: the reference's loss of one is NaN.
    """
    examples = _examples(config.data, config, tokenizer)
    if not examples:
        raise InvalidInputError(f"{config.data} holds no conversations")
    # Each example's first label is its BOS, labelled with itself as the reference does: the answers come after it.
    if all(label == IGNORE_INDEX for _, labels in examples for label in labels[1:]):
        raise InvalidInputError(f"{config.data} has no assistant answers to learn from")
    if config.mix_data:
        examples = _mixed(examples, config, tokenizer)
    blocks = pack(
        examples,
        config.seq_len,
        pad_token_id(tokenizer),
        config.random_concat_ratio,
        config.seed,
        tokenizer.bos_token_id,
    )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed)).tolist()
    kept = int(len(blocks) * (1 - config.eval_fraction))
    held_out = len(blocks) - kept
    train_blocks = [blocks[i] for i in order[:kept]]
    eval_blocks = [blocks[i] for i in order[kept:] if _targets(blocks[i])]
    if not train_blocks:
        raise InvalidInputError(
            f"{config.data} packs into {len(blocks)} block(s) of --seq-len {config.seq_len}, all held out for eval "
            "loss; add data, lower --seq-len, or use --eval-fraction 0"
        )
    if config.batch_size > len(train_blocks):
        raise InvalidInputError(
            f"--batch-size {config.batch_size} is more than the {len(train_blocks)} blocks the training data packs "
            "into: a micro-batch would hold a block twice"
        )
    status(
        f"Packed {len(blocks)} blocks of {config.seq_len} tokens: {len(train_blocks)} to train on, "
        f"{held_out} held out for eval loss"
    )
    if not eval_blocks and config.keep == "best":
        reason = (
            f"the {held_out} held-out block(s) hold no answer tokens"
            if held_out
            else f"--eval-fraction {config.eval_fraction:g} holds out none of the {len(blocks)} blocks"
        )
        status(f"warning: no eval loss ({reason}): --keep best ships the last step")
    return train_blocks, eval_blocks


def _examples(data: str, config: TrainingConfig, tokenizer, seed: int | None = None, limit: int | None = None) -> list:
    conversations = islice(load_conversations(data, config.split, seed), limit)
    return [tokenize_conversation(messages, tokenizer, config.chat_template) for messages in conversations]


def _mixed(task: list, config: TrainingConfig, tokenizer) -> list:
    """Task examples with `mix_ratio` general ones per task example, drawn in the seed's order (cycled when the
    general data is the smaller), then shuffled together with the seed so every block mixes both."""
    wanted = round(config.mix_ratio * len(task))
    general = _examples(config.mix_data, config, tokenizer, seed=config.seed, limit=wanted) if wanted else []
    examples = task + [general[i % len(general)] for i in range(wanted)]
    random.Random(config.seed).shuffle(examples)
    return examples


class _DataOrder:
    """Sample i of the run is block `permutation(epoch)[i % n]`: a pure function of the seed and i."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self._epochs = size, seed, {}

    def take(self, start: int, count: int) -> list[int]:
        return [self._permutation(i // self.size)[i % self.size] for i in range(start, start + count)]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epochs = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._epochs[epoch]


def _targets(block: tuple[list[int], list[int]]) -> int:
    """The tokens of a block that carry loss (a label predicts the next token, so the first label never counts)."""
    labels = block[1]
    return len(labels) - 1 - labels[1:].count(IGNORE_INDEX)


def _batch(blocks, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = [blocks[i] for i in indices]
    input_ids = torch.tensor([ids for ids, _ in chosen], dtype=torch.long, device=device)
    labels = torch.tensor([labels for _, labels in chosen], dtype=torch.long, device=device)
    return input_ids, labels


def _param_groups(trainable: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay weights, not biases or norms (as the reference's Hugging Face Trainer does)."""
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
