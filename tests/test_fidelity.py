"""Fidelity to the reference repo (deepseek-ai/ESFT): the published data formats to the reference's tokens."""

from __future__ import annotations

import json
from itertools import islice

import pytest
from transformers import AutoTokenizer

from expert_hub.data import parse_messages, prompt_ids, read_conversations, tokenize_conversation
from expert_hub.demo import demo_base

from .reference import reference_code


def reference_tokens(messages: list[dict], tokenizer) -> list[list[int]]:
    """The reference's input and target ids of a conversation: `get_formatted_input_and_target` of its `utils.py`."""
    reference = reference_code("utils.py", "get_formatted_input_and_target")
    return reference.get_formatted_input_and_target(messages, tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_base())


@pytest.mark.parametrize("task", ["law", "intent"])
def test_published_training_data_formats_to_the_reference_tokens(esft_data, tokenizer, task):
    path = esft_data / f"datasets/train/{task}.jsonl"
    raw = [json.loads(line)["messages"] for line in islice(path.open(encoding="utf-8"), 50)]
    ours = list(islice(read_conversations(path), 50))
    assert any(m["content"] != m["content"].strip() for messages in raw for m in messages)  # stripping matters here
    for messages, parsed in zip(raw, ours, strict=True):
        assert list(tokenize_conversation(parsed, tokenizer)) == reference_tokens(messages, tokenizer)


def test_a_masked_answer_is_input_without_loss_as_in_the_reference(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": " q1 "},
            {"role": "assistant", "content": "a1\n\n", "mask": 1},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "mask": 0},
        ]
    }
    messages = parse_messages(json.loads(json.dumps(record)))
    assert [m.get("mask") for m in messages] == [None, 1, None, 0]
    assert list(tokenize_conversation(messages, tokenizer)) == reference_tokens(record["messages"], tokenizer)
    with pytest.raises(ValueError, match="mask"):
        parse_messages({"messages": [{"role": "assistant", "content": "a", "mask": "yes"}]})


def test_prompts_are_formatted_as_training_formats_them(tokenizer):
    question = [{"role": "user", "content": "What is the verdict?\n\n"}]
    ids, _ = reference_tokens(question, tokenizer)
    assert prompt_ids(question, tokenizer) == ids
