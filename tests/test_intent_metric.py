"""`intent_match` scores exactly as the reference's `IntentEvaluator` (deepseek-ai/ESFT `benchmarks.py`, run from
../shared/esft/reference/): every case is scored by both.
"""

from __future__ import annotations

import json
from random import Random

import pytest

from expert_hub.errors import InvalidInputError
from expert_hub.evaluation import SCORERS, intent_match

from .reference import reference_code, reference_file


def oracle(completion: str, answer: str) -> float:
    """The reference's score of one completion: its `IntentEvaluator.eval_metric` on one sample (post-processing,
    then `_metrics`), the evaluator made without its `__init__`, which wants an eval config."""
    evaluator = reference_code("benchmarks.py", "IntentEvaluator").IntentEvaluator
    return evaluator.__new__(evaluator).eval_metric([{"raw_prediction": completion, "raw_answers": [answer]}])[0]


def ours(completion: str, answer: str) -> float:
    return intent_match([completion], [[answer]])


ANSWER = '{"intent": "Alarm-Update", "slots": {"datetime_date": "今天", "notes": ["追剧", "买菜"]}}'
SAME = '{"intent": "Alarm-Update", "slots": {"datetime_date": "今天", "notes": ["追剧", "买菜"]}}'
LABEL = "答案\uff1a"  # the prompts' answer label, with its full-width colon
SPACED = '{"intent": "Video-Play", "slots": {"name": "bang bang"}}'
EDGE_CASES = {  # name: (completion, answer, the reference's score)
    "plain, with the full stop the model adds": (f" {SAME}。", ANSWER, 1),
    "fenced JSON": (f"```json\n{SAME}\n```", ANSWER, 1),
    "fenced JSON between prose": (f"Here it is:\n```json\n{SAME}\n```\nAnything else?", ANSWER, 1),
    "fenced JSON on one line": (f"```json {SAME} ```", ANSWER, 1),
    "a fence without `json` is not looked into": (f"```\n{SAME}\n```", ANSWER, 0),
    "an unclosed fence scores as {}": (f"```json\n{SAME}", ANSWER, 0),
    "an unclosed fence and an answer of {}": ("```json\n{}", "{}", 1),
    "text on the lines after the object": (f"{SAME}\nThe user wants an alarm.\n\n{{}}", ANSWER, 1),
    "text after the object on its line": (f"{SAME} (an alarm)", ANSWER, 0),
    "full stops after the object": (f"{SAME}...。", ANSWER, 1),
    "a full stop before a CRLF": (f"{SAME}。\r\nmore", ANSWER, 0),
    "a CRLF alone": (f"{SAME}\r\nmore", ANSWER, 1),
    "a prefix before {": (f"{LABEL} {SAME}", ANSWER, 0),
    "a prefix on the line before": (f"{LABEL}\n{SAME}", ANSWER, 0),
    "blank lines before the object": (f"\n\n  {SAME}", ANSWER, 1),
    "spaces inside a predicted value": (SAME.replace("今天", "今 天 "), ANSWER, 1),
    "spaces inside a predicted list item": (SAME.replace("追剧", " 追 剧"), ANSWER, 1),
    "a tab inside a predicted value": (SAME.replace("今天", "今\\t天"), ANSWER, 0),
    "a list in another order": (SAME.replace('["追剧", "买菜"]', '["买菜", "追剧"]'), ANSWER, 1),
    "a list with an item missing": (SAME.replace('["追剧", "买菜"]', '["追剧"]'), ANSWER, 0),
    "a list for a single value": (SAME.replace('"今天"', '["今天"]'), ANSWER, 0),
    "a one-item list equals the text of its tuple": ('{"slots": {"a": "(\'x\',)"}}', '{"slots": {"a": ["x"]}}', 1),
    "a wrong intent": (SAME.replace("Alarm-Update", "Alarm-Query"), ANSWER, 0),
    "a wrong value": (SAME.replace("今天", "明天"), ANSWER, 0),
    "a missing slot": ('{"intent": "Alarm-Update", "slots": {"datetime_date": "今天"}}', ANSWER, 0),
    "an extra slot": (SAME.replace('"slots": {', '"slots": {"x": "y", '), ANSWER, 0),
    "no slots against no slots": ('{"intent": "Alarm-Update"}', '{"intent": "Alarm-Update", "slots": {}}', 1),
    "no intent against no intent": ('{"slots": {}}', "{}", 1),
    "a number for a text value": ('{"slots": {"n": 5}}', '{"slots": {"n": "5"}}', 0),
    "numbers inside a list": ('{"slots": {"n": [2, 1]}}', '{"slots": {"n": ["1", "2"]}}', 1),
    "slots that are not an object": ('{"intent": "a", "slots": []}', '{"intent": "a", "slots": {}}', 0),
    "Python's quotes": (SAME.replace('"', "'"), ANSWER, 0),
    "unparseable": ("I cannot parse that request.", ANSWER, 0),
    "empty": ("", ANSWER, 0),
    "only spaces and full stops": ("  。. ", ANSWER, 0),
    "deeply nested": ("[" * 100_000, ANSWER, 0),
}


@pytest.mark.parametrize("completion, answer, score", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_edge_cases_score_as_the_reference_scores_them(completion, answer, score):
    assert oracle(completion, answer) == score
    assert ours(completion, answer) == score


# The one deliberate difference: the reference drops spaces from predicted values only, so an answer value with a
# space never matches; expert-hub drops them from both sides.  name: (completion, answer, reference's, ours)
SPACED_ANSWERS = {
    "an answer value with a space, predicted as it is": (SPACED, SPACED, 0, 1),
    "an answer value with a space, predicted without": (SPACED.replace(" bang", "bang"), SPACED, 0, 1),
    "an answer list item with a space": ('{"slots": {"a": ["x y"]}}', '{"slots": {"a": ["x y"]}}', 0, 1),
    "an answer value with a space, predicted wrong": (SPACED.replace("bang bang", "bang"), SPACED, 0, 0),
}


@pytest.mark.parametrize("completion, answer, reference, score", SPACED_ANSWERS.values(), ids=SPACED_ANSWERS.keys())
def test_answer_values_with_spaces_can_be_matched(completion, answer, reference, score):
    assert oracle(completion, answer) == reference
    assert ours(completion, answer) == score
    assert ours(completion, answer) == oracle(completion, _spaces_dropped(answer))


def _spaces_dropped(answer: str) -> str:
    """The answer as expert-hub compares it: the reference's oracle given this scores as expert-hub does."""
    record = json.loads(answer)
    record["slots"] = {
        key: [item.replace(" ", "") for item in value] if isinstance(value, list) else value.replace(" ", "")
        for key, value in record.get("slots", {}).items()
    }
    return json.dumps(record, ensure_ascii=False)


@pytest.mark.parametrize(
    "completion", ["123", "null", '["a"]', '"text"', "```json\n\n```"], ids=["number", "null", "list", "text", "fence"]
)
def test_what_ends_the_reference_run_scores_zero(completion):
    """JSON that is not an object, or a fence holding only newlines, raises in the reference and ends its run."""
    with pytest.raises((AttributeError, IndexError)):
        oracle(completion, ANSWER)
    assert ours(completion, ANSWER) == 0


@pytest.mark.parametrize("answer", ["not json", "[1]", '{"slots": ["a"]}'])
def test_an_answer_that_is_no_intent_record_is_an_input_error(answer):
    with pytest.raises(InvalidInputError, match="intent answers"):
        intent_match([SAME], [[answer]])


def test_only_the_first_answer_counts_and_scores_average():
    assert SCORERS["intent"] is intent_match
    assert intent_match([SAME, "no", SAME], [[ANSWER, "{}"], [ANSWER], ["{}", ANSWER]]) == pytest.approx(1 / 3)


@pytest.fixture(scope="session")
def published_completions() -> dict[str, list[dict]]:
    """The paper's model completions and their scores, the reference's `results/completions/{token,gate}/intent.jsonl`."""
    return {
        method: [
            json.loads(line)
            for line in reference_file(f"results/completions/{method}/intent.jsonl").read_text("utf-8").splitlines()
        ]
        for method in ("token", "gate")
    }


@pytest.mark.parametrize("method, published", [("token", 0.76), ("gate", 0.80)])
def test_published_completions_score_as_the_paper_scored_them(published_completions, method, published):
    records = [record["example"] for record in published_completions[method]]
    assert len(records) == 500
    predictions = [record["raw_prediction"] for record in records]
    answers = [record["raw_answers"] for record in records]
    per_record = [intent_match([p], [a]) for p, a in zip(predictions, answers)]
    assert per_record == [oracle(p, a[0]) for p, a in zip(predictions, answers)]
    assert per_record == [record["score"] for record in published_completions[method]]
    assert intent_match(predictions, answers) == pytest.approx(published)


def _perturbed(answer: str, rng: Random) -> str:
    """A completion made from an answer: maybe a changed value, reordered or spaced slots, a fence, a prefix, a tail."""
    record = json.loads(answer)
    slots = record["slots"]
    keys = list(slots)
    rng.shuffle(keys)
    slots = {key: slots[key][::-1] if isinstance(slots[key], list) else slots[key] for key in keys}
    if keys and rng.random() < 0.3:
        key = rng.choice(keys)
        slots[key] = rng.choice(["明天", " ".join(str(slots[key])), [str(slots[key])], 3])
    if rng.random() < 0.1:
        record["intent"] = record["intent"].lower()
    text = json.dumps({**record, "slots": slots}, ensure_ascii=False, indent=rng.choice([None, None, 2]))
    for chance, change in (
        (0.2, lambda t: f"```json\n{t}\n```"),
        (0.2, lambda t: rng.choice([f"{LABEL} ", "Sure:\n", "\n", "..."]) + t),
        (0.3, lambda t: t + rng.choice(["。", ".\nThat is all.", " ok", f"\n\n{LABEL}{{}}", "\n```"])),
    ):
        if rng.random() < chance:
            text = change(text)
    return text


def test_perturbed_completions_score_as_the_reference_scores_them(esft_data):
    lines = (esft_data / "datasets/eval/intent.jsonl").read_text().splitlines()
    answers = [json.loads(line)["raw_answers"] for line in lines]
    rng = Random(13)
    cases = [(_perturbed(refs[0], rng), refs) for refs in answers[:400]]
    scores = [intent_match([completion], [refs]) for completion, refs in cases]
    assert scores == [oracle(completion, _spaces_dropped(refs[0])) for completion, refs in cases]
    assert 0.2 < sum(scores) / len(scores) < 0.8, "the perturbations should give both right and wrong answers"
