"""Built-in tasks: generated data that lets every command run offline, and that the demo base was made from.

Each task draws (question, answer) pairs from a generator in `generators.py` with a seeded `random.Random`, so a
split is the same bytes on every machine. The eval split is drawn first; the train split skips its questions.
`in_demo_base` says whether the demo base saw the task in pretraining; the held-out ones are what ESFT teaches it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from random import Random

from ..data import Message
from ..errors import InvalidInputError
from . import general, generators

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    description: str
    metric: str  # an `expert_hub.evaluation` metric
    generate_one: Callable[[Random], tuple[str, str]]
    in_demo_base: bool
    max_new_tokens: int  # room for the longest answer
    train_size: int = 5000
    eval_size: int = 200

    def examples(self, split: str, count: int | None = None, seed: int = 0) -> list[list[Message]]:
        """`count` conversations of `split` (default: the split's size); the same arguments give the same data."""
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        size = count if count is not None else self.train_size if split == "train" else self.eval_size
        held = set() if split == "eval" else {q for q, _ in self._pairs("eval", self.eval_size, seed, set())}
        return [_conversation(q, a) for q, a in self._pairs(split, size, seed, held)]

    def eval_records(self, limit: int | None = None) -> list[dict]:
        """The eval split as `expert_hub.evaluation.evaluate_records` takes it."""
        return [
            {"prompt": None, "answers": [messages[-1]["content"]], "messages": messages}
            for messages in self.examples("eval")[:limit]
        ]

    def _pairs(self, split: str, count: int, seed: int, skip: set[str]) -> list[tuple[str, str]]:
        """`count` pairs whose questions are not in `skip`; the eval split also has no repeated question."""
        rng = Random(f"{self.name}/{split}/{seed}")  # str seeds hash with sha512: stable across runs and machines
        pairs: list[tuple[str, str]] = []
        seen = set(skip)
        for _ in range(100 * count):
            if len(pairs) == count:
                return pairs
            question, answer = self.generate_one(rng)
            if question not in seen:
                pairs.append((question, answer))
                if split == "eval":
                    seen.add(question)
        raise InvalidInputError(f"task {self.name!r} cannot draw {count} distinct {split} questions")


def _conversation(question: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        BuiltinTask(
            "math",
            "arithmetic word problems, worked step by step",
            "exact",
            generators.math,
            in_demo_base=True,
            max_new_tokens=48,
        ),
        BuiltinTask(
            "code", "a Python snippet -> what it prints", "exact", generators.code, in_demo_base=True, max_new_tokens=24
        ),
        BuiltinTask(
            "summary",
            "a record -> its key facts in one sentence",
            "exact",
            generators.summary,
            in_demo_base=True,
            max_new_tokens=40,
        ),
        BuiltinTask(
            "law",
            "case facts -> the verdict under a written code",
            "exact",
            generators.law,
            in_demo_base=False,
            max_new_tokens=32,
        ),
        BuiltinTask(
            "intent",
            "a request -> its JSON intent and slots",
            "intent",
            generators.intent,
            in_demo_base=False,
            max_new_tokens=48,
        ),
        BuiltinTask(
            "translation",
            "English -> Velan, a constructed language",
            "bleu",
            generators.translation,
            in_demo_base=False,
            max_new_tokens=24,
        ),
        BuiltinTask(
            "general",
            "generic text: stories, news, messages, notes",
            "loss",
            general.general,
            in_demo_base=True,
            max_new_tokens=80,
        ),
    )
}


def builtin_task(name: str) -> BuiltinTask:
    if name not in BUILTIN_TASKS:
        raise InvalidInputError(f"no built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]


def export(name: str, directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `train.jsonl` and `eval.jsonl` (conversations in the reference format) into `directory`.

    Each file is written to a temporary file of its own and renamed, so an interrupted export leaves no half
    file and two exports at once do not mix (both write the same bytes).
    """
    task, directory = builtin_task(name), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        partial = directory / f".{split}.jsonl.{os.getpid()}.partial"
        with open(partial, "w", encoding="utf-8") as file:
            for messages in task.examples(split, seed=seed):
                file.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        paths[split] = partial.replace(directory / f"{split}.jsonl")
    return paths
