"""Evaluating a model on task data: loss / perplexity, and greedy generation scored against answers.

Metrics:
- `loss`: mean loss per answer token (the assistant turns), and its perplexity.
- `exact`: the generated answer equals one of the reference answers (after trimming whitespace).
- `intent`: the reference's intent metric exactly (deepseek-ai/ESFT `IntentEvaluator`): the JSON on the completion's
  first line (or in a ```json fence) has the answer's `intent` and `slots`.
- `bleu`: corpus BLEU (sacrebleu; Chinese tokenization when the references contain CJK text).
- `judge`: an LLM judge's 0-10 score scaled to 0-1, with the reference's prompts (`expert_hub.judge`).
Works on conversations and on the reference eval files (`{"prompt", "raw_answers"}`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import IGNORE_INDEX, pad, pad_token_id, prompt_ids, read_eval_records, tokenize_conversation
from .errors import InvalidInputError

if TYPE_CHECKING:
    from .judge import JudgeConfig

METRICS = ("loss", "exact", "intent", "bleu", "judge")


def evaluate(
    model: nn.Module,
    tokenizer,
    data: str,
    metric: str = "loss",
    split: str = "test",
    chat_template: bool = False,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seq_len: int = 4096,
    limit: int | None = None,
    on_records: Callable[[int, int], None] | None = None,
    judge: JudgeConfig | None = None,
    on_judged: Callable[[int, int], None] | None = None,
) -> dict:
    """Evaluate `model` on `data` with one metric; returns `{"metric", "value", "count", ...}`.

    `on_records(done, total)` is called as records are scored; the `judge` metric needs `judge` and calls
    `on_judged(done, total)` as judgements come in.
    """
    records = read_eval_records(data, split)[:limit]
    if not records:
        raise InvalidInputError(f"{data} holds no records to evaluate")
    return evaluate_records(
        model,
        tokenizer,
        records,
        metric,
        chat_template,
        max_new_tokens,
        batch_size,
        seq_len,
        on_records,
        judge,
        on_judged,
    )


def evaluate_records(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    metric: str = "loss",
    chat_template: bool = False,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    seq_len: int = 4096,
    on_records: Callable[[int, int], None] | None = None,
    judge: JudgeConfig | None = None,
    on_judged: Callable[[int, int], None] | None = None,
) -> dict:
    """`evaluate` on records already read (`{"prompt", "answers", "messages"}`, as `read_eval_records` gives)."""
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "judge" and judge is None:
        raise InvalidInputError("the judge metric needs a judge: a JudgeConfig with its URL and model")
    model.eval()
    progress = (lambda done: on_records(done, len(records))) if on_records else None
    if metric == "loss":
        examples = [_loss_example(record, tokenizer, chat_template) for record in records]
        return loss_over_examples(model, examples, batch_size, seq_len, progress)
    prompts = [prompt_ids(record["prompt"] or record["messages"][:-1], tokenizer, chat_template) for record in records]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    answers = [record["answers"] for record in records]
    if metric == "judge" and judge is not None:  # (checked above: the judge metric comes with a judge)
        from .judge import judge_scores

        result = {"metric": metric, "count": len(records)} | judge_scores(predictions, answers, judge, on_judged)
    else:
        result = {"metric": metric, "count": len(records), "value": SCORERS[metric](predictions, answers)}
    result["examples"] = [
        {"prompt": tokenizer.decode(p[-64:]), "prediction": y, "answers": a[:3]}
        for p, y, a in list(zip(prompts, predictions, answers))[:3]
    ]
    return result


def _loss_example(record: dict, tokenizer, chat_template: bool) -> tuple[list[int], list[int]]:
    if record["messages"] is not None:
        return tokenize_conversation(record["messages"], tokenizer, chat_template)
    prompt = prompt_ids(record["prompt"], tokenizer)
    answer = [*tokenizer.encode(f" {record['answers'][0].strip()}", add_special_tokens=False), tokenizer.eos_token_id]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def loss_over_examples(
    model,
    examples: list[tuple[list[int], list[int]]],
    batch_size: int,
    seq_len: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Mean loss per target token (and perplexity) over `(input_ids, labels)` examples: `expert-hub eval --metric
    loss`. (Training's held-out loss weighs each block the same instead, as the reference does.)"""
    losses = example_losses(model, examples, batch_size, seq_len, progress)
    tokens = sum(count for _, count in losses)
    if not tokens:
        raise InvalidInputError("the evaluation data has no answer tokens to score")
    loss = sum(total for total, _ in losses) / tokens
    return {
        "metric": "loss",
        "value": loss,
        "perplexity": math.exp(min(loss, 700)),
        "tokens": tokens,
        "count": len(examples),
    }


@torch.no_grad()
def example_losses(
    model,
    examples: list[tuple[list[int], list[int]]],
    batch_size: int,
    seq_len: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """Each example's summed loss over its target tokens, and how many there are (the last `seq_len` tokens of
    each; right-padded in batches). Per example, so that each caller weighs examples as it needs to."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = [
            (ids[-seq_len:], labels[-seq_len:]) if seq_len else (ids, labels)
            for ids, labels in examples[start : start + batch_size]
        ]
        input_ids, attention_mask = pad([ids for ids, _ in batch], 0)
        labels, _ = pad([target for _, target in batch], IGNORE_INDEX)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        logits = logits[:, :-1].float()  # each position predicts the next token, as in the models' own loss
        targets = labels[:, 1:].to(device)
        token_losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(targets.shape)
        losses += zip(token_losses.sum(dim=1).tolist(), (targets != IGNORE_INDEX).sum(dim=1).tolist())
        if progress:
            progress(len(batch))
    model.train(was_training)
    return losses


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions of prompt token ids, batched with left padding, cut at EOS."""
    device = next(model.parameters()).device
    padding = pad_token_id(tokenizer)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = prompts[start : start + batch_size]
        input_ids, attention_mask = pad(encoded, padding, left=True)
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=padding,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        if progress:
            progress(len(encoded))
    return [output.strip() for output in outputs]


def exact_match(predictions: list[str], answers: list[list[str]]) -> float:
    return sum(p.strip() in {a.strip() for a in refs} for p, refs in zip(predictions, answers)) / len(predictions)


def intent_match(predictions: list[str], answers: list[list[str]]) -> float:
    """Share of predictions whose intent and slots equal the first answer's: the reference's `IntentEvaluator`.

    Ported from deepseek-ai/ESFT `benchmarks.py` (`IntentEvaluator.post_process` and `_metrics`) so that scores
    compare with the paper's: the answer is cut out of the completion as the reference cuts it, then must parse as
    JSON whole; spaces are dropped from the predicted slot values only, list values are unordered.
    """
    return sum(_intent_score(prediction, refs[0]) for prediction, refs in zip(predictions, answers)) / len(predictions)


def _intent_answer_line(completion: str) -> str:
    """The text the reference parses: inside a ```json fence if there is one, its first non-empty line, less the
    full stops around it (`IntentEvaluator.post_process`); anything else on the line makes it unparseable."""
    text = completion.strip() or "None"
    text = text.strip(".。")
    if "```json" in text:
        text = text[text.index("```json") + len("```json") :]
        end = text.find("```")
        text = text[:end] if end != -1 else "{}"  # an unclosed fence: the reference scores "{}"
    if "\n" in text:
        lines = [line for line in text.split("\n") if line]
        # Only newlines inside the fence: the reference's `[...][0]` raises and ends its run; here it scores 0.
        text = lines[0] if lines else ""
    return text.strip(".。")


def _intent_score(completion: str, answer: str) -> int:
    """1 when the completion's JSON has the answer's intent and slots (`IntentEvaluator._metrics`), else 0.

    Where the reference's own code raises on a completion (JSON that is not an object) it would end the run; it
    scores 0 here, as the reference scores every other completion it cannot use.
    """
    expected = _intent_answer(answer)
    try:
        predicted = json.loads(_intent_answer_line(completion))
    except (ValueError, RecursionError):
        return 0
    if not isinstance(predicted, dict):
        return 0
    slots = _predicted_slots(predicted.get("slots", {}))
    same_intent = predicted.get("intent", "") == expected.get("intent", "")
    return int(same_intent and slots == _expected_slots(expected.get("slots", {})))


def _intent_answer(answer: str) -> dict:
    """The answer's JSON object; the reference assumes one (`json.loads`, then `.get`), so anything else is an error
    in the data, not a wrong prediction."""
    try:
        value = json.loads(answer)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("slots", {}), dict):
        raise InvalidInputError(f"intent answers are JSON objects with an object of slots, not {answer[:80]!r}")
    return value


def _expected_slots(slots: dict) -> dict:
    """The answer's slots, compared as the prediction's: lists as `_listed` writes them, spaces dropped from values.

    The one deliberate difference from the reference, which drops spaces from predicted values only: there an
    answer value with a space (`"nina simone"`, `"7 am"`) can never be matched, not even by itself. It is 1 of the
    reference's 500 eval answers (which both published models miss anyway), and most of the built-in intent task's.
    """
    return {key: _without_spaces(value) for key, value in slots.items()}


def _predicted_slots(slots: object) -> dict | None:
    """The prediction's slots as the reference compares them, spaces dropped from every value; None (wrong) where
    the reference's processing fails: slots that are not an object, a value neither text nor a list."""
    if not isinstance(slots, dict) or not all(isinstance(value, (str, list)) for value in slots.values()):
        return None
    return {key: _without_spaces(value) for key, value in slots.items()}


def _without_spaces(value: str | list | object):
    """A slot value as the reference compares a predicted one: spaces dropped, a list as `_listed` writes it."""
    if isinstance(value, list):
        return _listed([str(item).replace(" ", "") for item in value])
    return value.replace(" ", "") if isinstance(value, str) else value


def _listed(items: list) -> str:
    """A list value as the reference writes it to compare it: the text of the tuple of its items' text, sorted, so
    the order does not count (and, as there, `["a"]` equals the text `"('a',)"`)."""
    return str(tuple(sorted(str(item) for item in items)))


def bleu(predictions: list[str], answers: list[list[str]]) -> float:
    import sacrebleu

    references = [refs[0] for refs in answers]
    cjk = any(re.search(r"[\u3400-\u9fff]", ref) for ref in references)
    return sacrebleu.corpus_bleu(predictions, [references], tokenize="zh" if cjk else "13a").score


SCORERS: dict[str, Callable[[list[str], list[list[str]]], float]] = {
    "exact": exact_match,
    "intent": intent_match,
    "bleu": bleu,
}
