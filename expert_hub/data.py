"""Task data: conversations from JSONL files or Hugging Face datasets, tokenized with loss masks, packed.

Accepted records are the ESFT reference format `{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]}` and OpenAI chat fine-tuning lines, which add `system` turns.
JSONL files are read lazily, so scoring a 2^17-token sample of a huge file reads only what it needs; in the
reference's shuffled order (`seed`), only each line's number and offset are held, not the conversations.
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NotRequired, TypedDict

import torch

from .errors import InvalidInputError
from .io import MAX_LINE_BYTES, first_line, numbered_lines, numbered_lines_with_offsets


class Message(TypedDict):
    """One turn of a conversation; `mask: 1` marks an assistant turn that carries no loss."""

    role: str
    content: str
    mask: NotRequired[int]


ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of tokens that carry no loss


def read_conversations(path: str | Path, seed: int | None = None) -> Iterator[list[Message]]:
    """Yield each JSONL line's messages; a malformed line raises with `file:line` and what is wrong.

    In file order, or with `seed` in the order the reference shuffles its training set before scoring (`shuffled`).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"data file not found: {path}")
    for number, line in numbered_lines(path) if seed is None else _shuffled_lines(path, seed):
        try:
            yield parse_messages(json.loads(line))
        except (json.JSONDecodeError, ValueError) as error:
            raise InvalidInputError(f"{path}:{number}: {error}") from error
        except RecursionError as error:
            raise InvalidInputError(f"{path}:{number}: nested too deeply") from error


def load_conversations(data: str | Path, split: str = "train", seed: int | None = None) -> Iterator[list[Message]]:
    """Conversations from a JSONL file, or from a Hugging Face dataset (a saved directory or a Hub name).

    In their order, or with `seed` in the order the reference shuffles its training set before scoring.
    """
    path = Path(data)
    if path.suffix in _DATASET_FILES and path.is_file():  # one file in a format `datasets` reads
        records = _load_dataset_file(path)
    elif path.is_file() or path.suffix in (".jsonl", *_DATASET_FILES):  # (a missing file: "data file not found")
        yield from read_conversations(path, seed)
        return
    else:
        records = _load_dataset(str(data), split)
    rows = enumerate(records) if seed is None else ((row, records[row]) for row in shuffled(len(records), seed))
    for number, record in rows:
        try:
            yield parse_messages(record)
        except ValueError as error:
            raise InvalidInputError(f"{data} [{split}] row {number}: {error}") from error


def shuffled(size: int, seed: int) -> array:
    """Positions 0..size-1 in the order `random.seed(seed); random.shuffle(items)` leaves `size` items.

    The reference's `scripts/expert/get_expert_scores.py` does exactly that to its training set before it takes
    the tokens to score (with 5934875, also `configs/base.yaml`'s seed, which `train.py` gives `random.seed`), so a
    file sorted by topic is still sampled evenly. `random.Random(seed)` is the generator `random.seed(seed)` sets,
    and its shuffle's swaps depend only on the length, so shuffling positions gives the reference's permutation.
    """
    order = array("q", range(size))  # 8 bytes a position, not a Python int each
    random.Random(seed).shuffle(order)
    return order


def _shuffled_lines(path: Path, seed: int) -> Iterator[tuple[int, str]]:
    """`numbered_lines` in `shuffled` order; only each line's number and offset are held between the passes."""
    numbers, offsets = array("q"), array("q")
    for number, offset, _ in numbered_lines_with_offsets(path):  # the first pass also checks every line
        numbers.append(number)
        offsets.append(offset)
    with path.open("rb") as lines:
        for position in shuffled(len(numbers), seed):
            lines.seek(offsets[position])
            number = numbers[position]
            yield number, lines.readline(MAX_LINE_BYTES + 1).decode("utf-8-sig" if number == 1 else "utf-8")


_DATASET_FILES = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_dataset_file(path: Path):
    """A .json (JSON lines or one array), .parquet or .csv file, read as `datasets.load_dataset` reads it."""
    import datasets

    try:
        return datasets.load_dataset(_DATASET_FILES[path.suffix], data_files=str(path), split="train")
    except Exception as error:
        raise InvalidInputError(f"cannot read {path} as {_DATASET_FILES[path.suffix]}: {first_line(error)}") from error


def _load_dataset(name: str, split: str):
    import datasets

    try:
        if (Path(name) / "dataset_info.json").is_file() or (Path(name) / "state.json").is_file():
            loaded = datasets.load_from_disk(name)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(name, split=split)
    except Exception as error:
        raise InvalidInputError(f"cannot load dataset {name!r} split {split!r}: {first_line(error)}") from error


def parse_messages(record) -> list[Message]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError('expected an object with a non-empty "messages" list')
    messages = []
    for message in record["messages"]:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f'each message needs a "role" in {ROLES}')
        if not isinstance(message.get("content"), str):
            raise ValueError('each message needs a string "content"')
        if not message["content"].isascii():
            try:
                message["content"].encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate such as "\ud800": JSON allows it, no tokenizer does
                raise ValueError("a message holds a lone surrogate (\\ud800-\\udfff), which is not text") from error
        turn = Message(role=message["role"], content=message["content"])
        if (mask := _mask(message)) is not None:
            turn["mask"] = mask
        messages.append(turn)
    return messages


def _mask(message: dict) -> int | None:
    """A turn's `"mask"` (0 or 1), kept when it has one: the reference trains on no assistant turn marked 1.

    A missing mask, or the None a Hugging Face dataset gives rows without one, is no mask.
    """
    mask = message.get("mask")
    if mask is None:
        return None
    if mask not in (0, 1):  # True and False compare equal to 1 and 0, as in the reference's `== 1`
        raise ValueError('a message\'s "mask" must be 0 or 1')
    return int(mask)


def _trains_on(message: Message) -> bool:
    """Whether a turn's tokens carry loss: assistant turns not marked `"mask": 1`, as the reference decides."""
    return message["role"] == "assistant" and message.get("mask", 0) != 1


def reference_segments(messages: list[Message]) -> list[tuple[str, bool]]:
    """The reference repo's prompt format as (text, is_answer) pieces: `User: {q}\\n\\nAssistant:` then ` {a}`.

    Every turn is stripped first, as the reference's `get_formatted_question` / `get_formatted_answer` do: the
    published answers end in "\\n\\n", which must be neither learned nor scored. A system message, which the
    reference format has no slot for, goes first as a plain paragraph. `is_answer` is False for an assistant turn
    marked `"mask": 1`: it is part of the input but carries no loss.
    """
    segments = []
    for message in messages:
        role, content = message["role"], message["content"].strip()
        if role == "system":
            segments.append((f"{content}\n\n", False))
        elif role == "user":
            segments.append((f"User: {content}\n\nAssistant:", False))
        else:
            segments.append((f" {content}", _trains_on(message)))
    return segments


# `reference_segments` as a chat template, for a server whose base has none: chat requests then see what training
# saw (`serving` passes it to vLLM). `tests/test_serving.py` renders conversations with it against `prompt_ids`.
REFERENCE_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] | trim }}\n\nAssistant:"
    "{% else %} {{ message['content'] | trim }}{{ eos_token or '' }}{% endif %}"
    "{% endfor %}"
)


def tokenize_conversation(
    messages: list[Message], tokenizer, chat_template: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels; only assistant tokens (and the EOS closing each answer) carry loss, as in the reference's
    `get_formatted_input_and_target`, except on turns marked `"mask": 1`.

    The default is the reference format with BOS first and EOS after each answer, each piece tokenized on its
    own as the reference does. `chat_template=True` uses the tokenizer's own template instead, labelling the
    tokens each assistant turn adds to the rendered conversation.
    """
    if chat_template:
        return _tokenize_with_chat_template(messages, tokenizer)
    input_ids, labels = [], []
    if tokenizer.bos_token_id is not None:  # labelled with itself, as the reference does: once packed after another
        input_ids.append(tokenizer.bos_token_id)  # example, the model learns that a BOS follows an EOS
        labels.append(tokenizer.bos_token_id)
    for message, (text, is_answer) in zip(messages, reference_segments(messages), strict=True):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if message["role"] == "assistant" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        input_ids.extend(ids)
        labels.extend(ids if is_answer else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def _tokenize_with_chat_template(messages: list[Message], tokenizer) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("the tokenizer has no chat template; drop --chat-template to use the reference format")
    turns = _template_turns(messages)
    input_ids: list[int] = []
    labels: list[int] = []
    for end, message in enumerate(messages, start=1):
        rendered = tokenizer.apply_chat_template(
            turns[:end], tokenize=False, add_generation_prompt=message["role"] != "assistant"
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if ids[: len(input_ids)] != input_ids:  # labels would shift: refuse rather than learn the wrong tokens
            raise InvalidInputError(
                "the chat template renders a conversation differently from its beginning; "
                "drop --chat-template to use the reference format"
            )
        new = ids[len(input_ids) :]
        input_ids = ids
        labels.extend(new if _trains_on(message) else [IGNORE_INDEX] * len(new))
    return input_ids, labels


def _template_turns(messages: list[Message]) -> list[Message]:
    """Turns as a chat template gets them: role and stripped content (no `mask`, which is expert-hub's to apply).

    The chat-template format is expert-hub's own, but its turns are stripped as the reference strips them: the
    content is the same data, and a template renders it verbatim, so the published answers' trailing "\\n\\n"
    would otherwise be learned before the end-of-turn token, and a prompt would differ from training's text.
    """
    return [{"role": message["role"], "content": message["content"].strip()} for message in messages]


def prompt_ids(prompt: str | list[Message], tokenizer, chat_template: bool = False) -> list[int]:
    """Token ids a model sees before it answers, built as training builds them.

    `prompt` is conversation turns up to the answer, or reference-format text (`User: …\n\nAssistant:`).
    Turns are tokenized as `tokenize_conversation` tokenizes them (each turn on its own, an EOS after each earlier
    answer), so an eval or routing prompt is token for token what the model was trained on before an answer.
    Reference-format text gets the BOS by hand, as in training; a chat template brings its own.
    """
    if chat_template and not isinstance(prompt, str):
        text = tokenizer.apply_chat_template(_template_turns(prompt), tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if not isinstance(prompt, str):
        return tokenize_conversation(prompt, tokenizer)[0]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(prompt, add_special_tokens=False)


def pack(
    examples: Iterable[tuple[list[int], list[int]]],
    seq_len: int,
    pad_token_id: int,
    random_concat_ratio: float,
    seed: int,
    bos_token_id: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples into blocks of exactly `seq_len`, as the reference's `get_examples_from_buffer_pad`.

    An example that does not fit the space left in a block keeps only its last tokens. An example that starts with
    the BOS (`bos_token_id`; None: examples carry none) and joins a non-empty block loses its first token with
    probability `random_concat_ratio`, so the model also learns examples run together; an example with no BOS
    (a tokenizer without one, such as Qwen-MoE's) keeps every token. As in the reference, the chance is drawn
    for every joining example and after the cut, so a cut example loses the first token of its tail: with a BOS,
    the blocks are the reference's. The last block is padded with labels ignored; as there, it is padding alone
    when the examples filled the block before it exactly, since the reference's held-out split counts it.
    """
    rng = random.Random(seed)
    blocks = []
    ids: list[int] = []
    labels: list[int] = []
    for example_ids, example_labels in examples:
        has_bos = example_ids[:1] == [bos_token_id]
        space = seq_len - len(ids)
        if len(example_ids) > space:
            example_ids, example_labels = example_ids[-space:], example_labels[-space:]
        if ids and rng.random() < random_concat_ratio and has_bos:
            example_ids, example_labels = example_ids[1:], example_labels[1:]
        ids, labels = ids + example_ids, labels + example_labels
        if len(ids) == seq_len:
            blocks.append((ids, labels))
            ids, labels = [], []
    padding = seq_len - len(ids)
    blocks.append((ids + [pad_token_id] * padding, labels + [IGNORE_INDEX] * padding))
    return blocks


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding token, or its end-of-sequence token when it has none (as most causal LMs)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad(sequences: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences as one `[batch, longest]` tensor filled with `value`, and the attention mask of the real tokens.

    Right padding for scoring and losses; left padding (`left=True`) for generation, so every prompt ends where
    the new tokens start.
    """
    length = max(len(ids) for ids in sequences)
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        padded[row, span], mask[row, span] = torch.tensor(ids, dtype=torch.long), 1
    return padded, mask


def read_eval_records(data: str | Path, split: str = "test") -> list[dict]:
    """Evaluation records `{"prompt": str, "answers": [str], "messages": [...] | None}`.

    Reads the reference eval files (`prompt` already formatted, `raw_answers`) and conversations, whose last
    assistant turn is the answer and everything before it the prompt.
    """
    path = Path(data)
    if path.is_file() and path.suffix not in (".parquet", ".csv"):
        first = next(numbered_lines(path), (0, ""))[1]
        if '"raw_answers"' in first:
            return list(_read_reference_eval(path))
    records = []
    for messages in load_conversations(data, split):
        if messages[-1]["role"] != "assistant":
            raise InvalidInputError(f"{data}: every conversation needs a final assistant answer to evaluate against")
        records.append({"prompt": None, "answers": [messages[-1]["content"]], "messages": messages})
    return records


def _read_reference_eval(path: Path) -> Iterator[dict]:
    for number, line in numbered_lines(path):
        try:
            record = json.loads(line)
            prompt, answers = record["prompt"], record["raw_answers"]
            if not isinstance(prompt, str) or not isinstance(answers, list) or not answers:
                raise ValueError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as error:
            raise InvalidInputError(
                f'{path}:{number}: expected {{"prompt": str, "raw_answers": [str, ...]}}'
            ) from error
        yield {"prompt": prompt, "answers": [str(answer) for answer in answers], "messages": None}
