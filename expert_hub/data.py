"""Task data: conversations read from JSONL and rendered with the reference prompt format.

Accepted lines are the ESFT reference format `{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]}` and OpenAI chat fine-tuning lines, which add `system` turns.
Files are read lazily, so scoring a 2^17-token sample of a huge file reads only what it needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidInputError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def read_conversations(path: str | Path) -> Iterator[list[Message]]:
    """Yield each line's messages; a malformed line raises with `file:line` and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_messages(json.loads(line))
            except (json.JSONDecodeError, ValueError) as error:
                raise InvalidInputError(f"{path}:{number}: {error}") from None


def _parse_messages(record) -> list[Message]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError('expected an object with a non-empty "messages" list')
    messages = []
    for message in record["messages"]:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f'each message needs a "role" in {ROLES}')
        if not isinstance(message.get("content"), str):
            raise ValueError('each message needs a string "content"')
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def render_reference(messages: list[Message], eos_token: str) -> str:
    """The reference repo's prompt format: `User: {q}\\n\\nAssistant: {a}<eos>` per turn.

    A system message, which the reference format has no slot for, goes first as a plain paragraph.
    """
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"User: {content}\n\nAssistant:")
        else:
            parts.append(f" {content}{eos_token}")
    return "".join(parts)
