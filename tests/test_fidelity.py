"""Fidelity to the reference repo (deepseek-ai/ESFT): the published data formats to the reference's tokens."""

from __future__ import annotations

import json
from itertools import islice

import pytest
from transformers import AutoTokenizer

from expert_hub.data import parse_messages, prompt_ids, read_conversations, tokenize_conversation
from expert_hub.demo import demo_base

# --- copied verbatim from the reference's utils.py ---
PROMPT_USER: str = "User: {input}\n\n"
PROMPT_ASSISTANT: str = "Assistant:"  # should not have a space at the end
ASSISTANT_RESPONSE: str = " {input}"


def get_formatted_question(line):
    return PROMPT_USER.format(input=str(line).strip()) + PROMPT_ASSISTANT


def get_formatted_answer(line):
    return ASSISTANT_RESPONSE.format(input=str(line).strip())


def get_formatted_input_and_target(messages, tokenizer, IGNORE_TOKEN_ID=-100, mask_prompt=True):
    input_ids = []
    target_ids = []
    for idx, message in enumerate(messages):
        if idx == 0:
            input_ids.extend([tokenizer.bos_token_id])
            target_ids.extend([tokenizer.bos_token_id])

        if message["role"] == "user":
            formatted_question = get_formatted_question(message["content"])
            tokenized_line = tokenizer.encode(formatted_question, add_special_tokens=False)
            input_ids.extend(tokenized_line)
            if mask_prompt:
                target_ids.extend([IGNORE_TOKEN_ID] * len(tokenized_line))
            else:
                target_ids.extend(tokenized_line)
        elif message["role"] == "assistant":
            formatted_answer = get_formatted_answer(message["content"])
            tokenized_line = tokenizer.encode(formatted_answer, add_special_tokens=False) + [tokenizer.eos_token_id]  # noqa: RUF005 (verbatim)
            input_ids.extend(tokenized_line)
            if message.get("mask", 0) == 1:
                target_ids.extend([IGNORE_TOKEN_ID] * len(tokenized_line))
            else:
                target_ids.extend(tokenized_line)
        else:
            raise AssertionError(f"Unknown role: {message['role']}")

    return [input_ids, target_ids]


# --- end of the reference's code ---


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
        assert list(tokenize_conversation(parsed, tokenizer)) == get_formatted_input_and_target(messages, tokenizer)


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
    assert list(tokenize_conversation(messages, tokenizer)) == get_formatted_input_and_target(
        record["messages"], tokenizer
    )
    with pytest.raises(ValueError, match="mask"):
        parse_messages({"messages": [{"role": "assistant", "content": "a", "mask": "yes"}]})


def test_prompts_are_formatted_as_training_formats_them(tokenizer):
    question = [{"role": "user", "content": "What is the verdict?\n\n"}]
    ids, _ = get_formatted_input_and_target(question, tokenizer)
    assert prompt_ids(question, tokenizer) == ids
