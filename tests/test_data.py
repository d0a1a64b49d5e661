"""Training data: reference packing, loss masks, chat templates, Hugging Face datasets, eval records."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from expert_hub.data import IGNORE_INDEX, load_conversations, pack, read_eval_records, tokenize_conversation
from expert_hub.errors import InvalidInputError

BOS = 1


def _example(start: int, length: int) -> tuple[list[int], list[int]]:
    """An example as tokenized with a BOS: the BOS, then `length - 1` tokens."""
    ids = [BOS, *range(start, start + length - 1)]
    return ids, [BOS, *ids[1:]]


def test_packing_follows_the_reference():
    examples = [_example(100, 4), _example(200, 5), _example(300, 3), _example(400, 2)]
    blocks = pack(examples, seq_len=6, pad_token_id=0, random_concat_ratio=0.0, seed=0, bos_token_id=BOS)
    # 4 tokens, then the last 2 of the 5-token example fill the block; 3 + 2 then padding
    assert [ids for ids, _ in blocks] == [[1, 100, 101, 102, 202, 203], [1, 300, 301, 1, 400, 0]]
    assert blocks[1][1] == [1, 300, 301, 1, 400, IGNORE_INDEX]
    dropped = pack(examples, seq_len=6, pad_token_id=0, random_concat_ratio=1.0, seed=0, bos_token_id=BOS)
    # joined examples lose their first token when the coin says so, after being cut to the space left (a cut
    # example loses a token of its tail), so a block can end short, exactly as in the reference; block starts keep
    # their BOS
    assert [ids for ids, _ in dropped] == [[1, 100, 101, 102, 203, 0]]
    assert pack(examples, 6, 0, 0.5, seed=1, bos_token_id=BOS) == pack(examples, 6, 0, 0.5, seed=1, bos_token_id=BOS)
    # examples without a BOS keep every token; as in the reference, examples that fill the last block exactly are
    # followed by a block of padding alone
    plain = [(ids[1:], labels[1:]) for ids, labels in examples[:2]]
    assert pack(plain, 7, 0, 1.0, seed=0, bos_token_id=BOS) == [
        ([100, 101, 102, 200, 201, 202, 203], [100, 101, 102, 200, 201, 202, 203]),
        ([0] * 7, [IGNORE_INDEX] * 7),
    ]


def test_chat_template_labels_only_the_assistant_turns(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3_moe"])
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    ids, labels = tokenize_conversation(messages, tokenizer, chat_template=True)
    assert tokenizer.decode(ids) == "<|user|>hi<eos><|assistant|>yo<eos><|user|>q<eos><|assistant|>a<eos>"
    learned = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert learned == "yo<eos>a<eos>"
    # turns are stripped as in the reference format; a masked answer stays in the input without loss
    padded = [m | {"content": f" {m['content']}\n\n"} for m in messages]
    padded[1]["mask"] = 1
    ids, labels = tokenize_conversation(padded, tokenizer, chat_template=True)
    assert tokenizer.decode(ids) == "<|user|>hi<eos><|assistant|>yo<eos><|user|>q<eos><|assistant|>a<eos>"
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == "a<eos>"
    del tokenizer.chat_template
    with pytest.raises(InvalidInputError, match="no chat template"):
        tokenize_conversation(messages, tokenizer, chat_template=True)


def test_hugging_face_datasets_are_read(tmp_path):
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "saved")
    assert list(load_conversations(tmp_path / "saved", "train")) == [row["messages"] for row in rows]
    with pytest.raises(InvalidInputError, match="split 'test'"):
        list(load_conversations(tmp_path / "saved", "test"))
    (tmp_path / "parquet").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    assert len(list(load_conversations(str(tmp_path / "parquet"), "train"))) == 3


def test_eval_records_from_reference_files_and_conversations(tmp_path, esft_data):
    records = read_eval_records(esft_data / "datasets/eval/intent.jsonl")
    assert len(records) == 500 and records[0]["prompt"].endswith("\n\nAssistant:")
    assert json.loads(records[0]["answers"][0])["intent"] == "Alarm-Update"
    conversations = read_eval_records(esft_data / "datasets/train/law.jsonl")
    assert conversations[0]["prompt"] is None and conversations[0]["answers"][0].startswith("双方达成调解")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "raw_answers": []}\n')
    with pytest.raises(InvalidInputError, match="bad.jsonl:1"):
        read_eval_records(tmp_path / "bad.jsonl")


def test_answer_scorers():
    from expert_hub.evaluation import bleu, exact_match, intent_match

    assert exact_match([" yes ", "no"], [["yes"], ["maybe", "nope"]]) == 0.5
    answer = '{"intent": "Alarm-Update", "slots": {"datetime_date": "今天", "notes": ["a", "b"]}}'
    predictions = [
        '{"intent": "Alarm-Update", "slots": {"datetime_date": "今 天", "notes": ["b", "a"]}}\nmore text',
        'sure: {"intent": "Alarm-Update", "slots": {"datetime_date": "明天", "notes": ["a", "b"]}}',
        "not json at all",
    ]
    assert intent_match(predictions, [[answer]] * 3) == pytest.approx(1 / 3)
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert 0 < bleu(["今天天气很好"], [["今天天气不错"]]) < 100


def test_single_files_are_read_as_datasets_reads_them(tmp_path):
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    expected = [row["messages"] for row in rows]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "law.parquet"))
    (tmp_path / "law.json").write_text(json.dumps(rows))  # one JSON array, not JSON lines
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    for name in ("law.parquet", "law.json", "bom.jsonl"):
        assert list(load_conversations(tmp_path / name)) == expected, name
    assert read_eval_records(tmp_path / "law.parquet")[0]["answers"] == ["a0"]
    with pytest.raises(InvalidInputError, match="data file not found"):
        list(load_conversations(tmp_path / "missing.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidInputError, match="cannot read .*broken.parquet as parquet"):
        list(load_conversations(tmp_path / "broken.parquet"))


def test_input_that_is_not_text_or_too_long_is_one_line(tmp_path, monkeypatch):
    from expert_hub import io

    (tmp_path / "surrogate.jsonl").write_text('{"messages": [{"role": "user", "content": "a\\ud800b"}]}\n')
    with pytest.raises(InvalidInputError, match=r"surrogate.jsonl:1: a message holds a lone surrogate"):
        list(load_conversations(tmp_path / "surrogate.jsonl"))
    monkeypatch.setattr(io, "MAX_LINE_BYTES", 1000)
    (tmp_path / "long.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}]}\n'
        + json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})
        + "\n"
    )
    with pytest.raises(InvalidInputError, match=r"long.jsonl:2: longer than 0 MiB"):
        list(load_conversations(tmp_path / "long.jsonl"))
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "not-a-dataset" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match=r"not-a-dataset \[train\] row 0: expected an object"):
        list(load_conversations(tmp_path / "not-a-dataset"))  # datasets reads it as text: not conversations
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(InvalidInputError, match="cannot load dataset"):
        list(load_conversations(tmp_path / "empty-dir"))


def test_a_disk_error_names_the_file_and_keeps_the_original_as_its_cause(tmp_path, monkeypatch):
    import errno
    import os

    from expert_hub.io import write_json_atomic

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as failed:
        write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert failed.value.filename == str(tmp_path / "out.json") and failed.value.errno == errno.ENOSPC
    assert failed.value.__cause__ is not failed.value and failed.value.__cause__.filename is None
    named = OSError(errno.EACCES, "Permission denied", "/somewhere/else")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(named))
    with pytest.raises(OSError) as failed:
        write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert failed.value is named and failed.value.__cause__ is None  # never its own cause
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_a_seed_orders_conversations_as_the_reference_shuffles_them(tmp_path):
    """get_expert_scores.py: `random.seed(5934875); random.shuffle(dataset)`, for JSONL files and datasets alike."""
    import random

    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(40)]
    state = random.getstate()
    random.seed(5934875)
    expected = [row["messages"] for row in rows]
    random.shuffle(expected)
    random.setstate(state)
    lines = [json.dumps(row) for row in rows]
    lines[3:3] = ["", "  "]  # blank lines are not conversations, as in file order
    (tmp_path / "data.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    for data in (tmp_path / "data.jsonl", tmp_path / "saved"):
        assert list(load_conversations(data, seed=5934875)) == expected, data
        assert list(load_conversations(data)) == [row["messages"] for row in rows], data
    (tmp_path / "data.jsonl").write_text("\n".join([*lines[:-1], "{broken"]) + "\n")
    with pytest.raises(InvalidInputError, match=r"data.jsonl:42: "):
        list(load_conversations(tmp_path / "data.jsonl", seed=1))
