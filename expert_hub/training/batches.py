"""The training data as the loop sees it: packed blocks with the reference's held-out split, a sample order that
is a pure function of the seed and the step (so a resumed run sees the batches an uninterrupted one would), and
each step's micro-batches for each rank."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import islice

import torch

from ..data import IGNORE_INDEX, load_conversations, pack, pad_token_id, tokenize_conversation
from ..errors import InvalidInputError
from .config import TrainingConfig


def micro_batches(step: int, config: TrainingConfig, accelerator, order: DataOrder) -> Iterator[list[int]]:
    """The block indices of this rank's micro-batches of `step`, one at a time, so that --grad-accumulation sizes
    no memory: micro-batch m of the step is sample block `(step * micro-batches + m) * processes + rank`."""
    for micro in range(config.grad_accumulation):
        position = (step * config.grad_accumulation + micro) * accelerator.num_processes + accelerator.process_index
        yield order.take(position * config.batch_size, config.batch_size)


def packed_data(config: TrainingConfig, tokenizer, status: Callable[[str], None]) -> tuple[list, list]:
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
        examples = mixed(examples, config, tokenizer)
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
    eval_blocks = [blocks[i] for i in order[kept:] if loss_tokens(blocks[i])]
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


def mixed(task: list, config: TrainingConfig, tokenizer) -> list:
    """Task examples with `mix_ratio` general ones per task example, drawn in the seed's order (cycled when the
    general data is the smaller), then shuffled together with the seed so every block mixes both."""
    assert config.mix_data is not None  # `packed_data` mixes only when there is general data
    wanted = round(config.mix_ratio * len(task))
    general = _examples(config.mix_data, config, tokenizer, seed=config.seed, limit=wanted) if wanted else []
    examples = task + [general[i % len(general)] for i in range(wanted)]
    random.Random(config.seed).shuffle(examples)
    return examples


class DataOrder:
    """Sample i of the run is block `permutation(epoch)[i % n]`: a pure function of the seed and i."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epochs: dict[int, list[int]] = {}

    def take(self, start: int, count: int) -> list[int]:
        return [self._permutation(i // self.size)[i % self.size] for i in range(start, start + count)]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epochs = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._epochs[epoch]


def loss_tokens(block: tuple[list[int], list[int]]) -> int:
    """The tokens of a block that carry loss (a label predicts the next token, so the first label never counts)."""
    labels = block[1]
    return len(labels) - 1 - labels[1:].count(IGNORE_INDEX)


def batch(blocks, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = [blocks[i] for i in indices]
    input_ids = torch.tensor([ids for ids, _ in chosen], dtype=torch.long, device=device)
    labels = torch.tensor([labels for _, labels in chosen], dtype=torch.long, device=device)
    return input_ids, labels
