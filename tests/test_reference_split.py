"""Fidelity to the reference's training (deepseek-ai/ESFT `train.py`, `utils.py`, read from ../shared/esft/reference):
the packed blocks and the held-out split, the held-out loss, the BOS a packed example drops, and the prompts that
eval and routing profiles build from earlier turns."""

from __future__ import annotations

import json
import random

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from expert_hub.data import IGNORE_INDEX, prompt_ids, read_conversations, tokenize_conversation
from expert_hub.demo import demo_base
from expert_hub.evaluation import loss_over_examples
from expert_hub.models import load_base
from expert_hub.routing import DEFAULT_SEED
from expert_hub.testing import byte_tokenizer
from expert_hub.training import TrainingConfig
from expert_hub.training.batches import packed_data
from expert_hub.training.loop import _eval_loss

from .reference import reference_code


@pytest.fixture(scope="module")
def reference():
    """The reference's own formatting and packing, from its published `utils.py`."""
    return reference_code("utils.py", "get_formatted_input_and_target", "get_examples_from_buffer_pad")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_base())


def _config(tmp_path, data, **overrides) -> TrainingConfig:
    return TrainingConfig(
        **{"task": "law", "base": demo_base(), "data": str(data), "out": str(tmp_path / "run")} | overrides
    )


def test_the_held_out_blocks_are_the_references(esft_data, reference, tokenizer, tmp_path):
    """`train.py` on the published law data with `configs/base.yaml` (seed 5934875, 4096 tokens, ratio 0.2): its
    `random.seed` before packing, its `torch.manual_seed` before `random_split(..., [int(n * 0.98), n - ...])`."""
    path = esft_data / "datasets/train/law.jsonl"
    samples = [json.loads(line) for line in path.open(encoding="utf-8")]
    buffer = [reference.get_formatted_input_and_target(s["messages"], tokenizer, -100) for s in samples]
    state = random.getstate()
    try:
        random.seed(DEFAULT_SEED)
        packed = reference.get_examples_from_buffer_pad(buffer, 4096, tokenizer, 0.2)
    finally:
        random.setstate(state)
    dataset = torch.utils.data.TensorDataset(packed["input_ids"], packed["labels"])
    with torch.random.fork_rng():
        torch.manual_seed(DEFAULT_SEED)
        n = len(dataset)
        train_split, valid_split = torch.utils.data.random_split(dataset, [int(n * 0.98), n - int(n * 0.98)])
    blocks = [(ids.tolist(), labels.tolist()) for ids, labels in dataset]
    assert (n, len(valid_split)) == (187, 4)  # held out: the permutation's tail, not int(0.02 n) = 3 of its head

    config = _config(tmp_path, path, seq_len=4096, random_concat_ratio=0.2, seed=DEFAULT_SEED)
    train_blocks, eval_blocks = packed_data(config, tokenizer, print)
    assert train_blocks == [blocks[i] for i in train_split.indices]
    # a held-out block of padding alone carries no loss (the reference's is NaN): eval loss leaves it out
    assert eval_blocks == [blocks[i] for i in valid_split.indices if set(blocks[i][1]) != {IGNORE_INDEX}]
    assert eval_blocks


def test_the_held_out_loss_is_the_mean_of_each_blocks_loss(tiny_models, tmp_path):
    """The reference's Trainer evaluates batches of 1 and averages their losses: each block's mean loss per target
    token counts once, however many targets it holds; a mean over all tokens would rank steps differently."""
    torch.manual_seed(0)
    model = load_base(str(tiny_models["qwen3_moe"])).eval()
    blocks = []
    for answer in (2, 30, 7):  # blocks of 32 tokens with 2, 30 and 7 target tokens
        ids = torch.randint(3, 256, (32,)).tolist()
        blocks.append((ids, [IGNORE_INDEX] * (32 - answer) + ids[32 - answer :]))
    with torch.no_grad():
        per_block = [model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() for ids, labels in blocks]
    config = _config(tmp_path, "unused.jsonl", batch_size=2)
    held_out = _eval_loss(model, blocks, config, Accelerator(cpu=True))
    assert held_out == pytest.approx(sum(per_block) / 3, rel=1e-5)
    assert held_out != pytest.approx(loss_over_examples(model, blocks, 2)["value"], rel=1e-3)


def test_a_packed_example_drops_only_a_real_bos(tmp_path):
    """With no BOS (Qwen-MoE's tokenizers), a joined example keeps its first token ("User"), whatever
    --random-concat-ratio; with one, it is the BOS that goes."""
    data = tmp_path / "task.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
            + "\n"
            for i in range(6)
        )
    )
    without_bos = byte_tokenizer()
    without_bos.bos_token = None
    with_bos = byte_tokenizer()
    config = _config(tmp_path, data, seq_len=512, random_concat_ratio=1.0, eval_fraction=0, batch_size=1, keep="last")
    user = without_bos.encode("User", add_special_tokens=False)
    for tokenizer, dropped in ((without_bos, []), (with_bos, [with_bos.bos_token_id] * 5)):
        examples = [tokenize_conversation(messages, tokenizer)[0] for messages in read_conversations(data)]
        start = [tokenizer.bos_token_id, *user] if tokenizer.bos_token_id is not None else user
        assert examples[1][: len(start)] == start
        [(ids, _)], _ = packed_data(config, tokenizer, print)  # one block: all six examples fit
        kept = ids[: len(ids) - ids.count(tokenizer.pad_token_id)]
        joined = [token for example in examples for token in example]
        assert len(joined) - len(kept) == len(dropped) and sorted(joined) == sorted(kept + dropped)


def test_multi_turn_prompts_are_formatted_as_training_formats_them(reference, tokenizer):
    """Eval prompts and routing profiles (`prompt_ids`) of a later turn: the earlier answers end with the EOS
    training put after them, and every turn is tokenized on its own, as the reference's training formats them."""
    turns = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer.\n\n"},
        {"role": "user", "content": "Second question?"},
    ]
    assert prompt_ids(turns, tokenizer) == tokenize_conversation(turns, tokenizer)[0]
    assert prompt_ids(turns[1:], tokenizer) == reference.get_formatted_input_and_target(turns[1:], tokenizer)[0]
    assert prompt_ids(turns, tokenizer).count(tokenizer.eos_token_id) == 1
