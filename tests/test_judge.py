"""The `judge` metric against a local OpenAI-compatible judge: the reference's prompts, requests and score parsing
(against the reference's own `benchmarks.py`), retries, unparseable judgements, refused replies, the deadline,
concurrency, the cache and `expert-hub eval --metric judge`.

The fake judge answers POST /v1/chat/completions in the reference's formats: 10 points when the prediction equals
the reference answer, 7.5 otherwise; no score at all for a prediction with "UNPARSEABLE" in it; a 500 to the first
request for "FLAKY" and to every request for "BROKEN"; for a prediction naming one of BAD_REPLIES, that reply; for
"HUGE", a judgement over 1 MiB; for "TRICKLE", a good reply a few bytes at a time, never pausing as long as a
timeout, over 5 s.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai import OpenAI

from expert_hub.errors import InvalidInputError
from expert_hub.evaluation import evaluate_records
from expert_hub.judge import (
    JUDGE_TASKS,
    SYSTEM_MESSAGE,
    JudgeConfig,
    judge_prompt,
    judge_scores,
    parse_score,
)

from .reference import reference_code

EVALUATOR_NAMES = {"summary": "SummaryEvaluator", "law": "LawEvaluator", "translation": "TranslationEvaluator"}


def reference_evaluator(task: str):
    """The reference's evaluator for `task` (benchmarks.py), without its `__init__`, which connects to Azure."""
    evaluator = getattr(reference_code("benchmarks.py", EVALUATOR_NAMES[task]), EVALUATOR_NAMES[task])
    return evaluator.__new__(evaluator)


def _completion(content: object) -> dict:
    return {"id": "j", "object": "chat.completion", "created": 0, "model": "fake-judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}  # fmt: skip


BAD_REPLIES = {  # marker in the prediction: the judge's reply (content type, body)
    "PLAIN": ("text/plain", "总分是：10分".encode()),
    "NOTJSON": ("application/json", b'{"choices": [{"message": {"content": "'),
    "LIST": ("application/json", json.dumps([_completion("总分是：10分")]).encode()),
    "NULLMESSAGE": (
        "application/json",
        json.dumps(_completion("") | {"choices": [{"index": 0, "message": None}]}).encode(),
    ),
    "NUMBER": ("application/json", json.dumps(_completion(10)).encode()),
}


class FakeJudge(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint that records every request and how many were under way at once."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.requests: list[dict] = []  # {"body", "authorization"} of every POST, failed ones included
        self.delay = 0.0
        self.broken = True  # "BROKEN" predictions fail while set
        self.bad_reply: str | None = None  # a key of BAD_REPLIES: the reply to every request
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        return [request["body"]["messages"][1]["content"] for request in self.requests]


class _JudgeHandler(BaseHTTPRequestHandler):
    server: FakeJudge

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
            asked = server.prompts().count(body["messages"][1]["content"])
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            time.sleep(server.delay)
            prompt = body["messages"][1]["content"]
            bad = server.bad_reply or next((marker for marker in BAD_REPLIES if marker in prompt), None)
            if self.path != "/v1/chat/completions":
                self._reply(404, {"error": {"message": f"no route {self.path}"}})
            elif ("FLAKY" in prompt and asked == 1) or ("BROKEN" in prompt and server.broken):
                self._reply(500, {"error": {"message": "the judge is overloaded"}})
            elif bad:
                self._send(200, *BAD_REPLIES[bad])
            elif "HUGE" in prompt:
                self._reply(200, _completion("总分是：10分" + "x" * 2**20))
            elif "TRICKLE" in prompt:
                self._send(200, "application/json", b" " * 300 + json.dumps(_completion("总分是：10分")).encode(), True)
            else:
                self._reply(200, _completion(_judgement(prompt)))
        finally:
            with server.lock:
                server.in_flight -= 1

    def _reply(self, status: int, payload: object) -> None:
        self._send(status, "application/json", json.dumps(payload).encode())

    def _send(self, status: int, content_type: str, data: bytes, trickle: bool = False) -> None:
        """`data` at once, or 8 bytes of it every 0.1 s until the client hangs up."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("retry-after-ms", "1")  # the openai client waits this long before a retry
        self.end_headers()
        pieces = [data[start : start + 8] for start in range(0, len(data), 8)] if trickle else [data]
        try:
            for piece in pieces:
                self.wfile.write(piece)
                time.sleep(0.1 if trickle else 0)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


def _judgement(prompt: str) -> str:
    """A reply in the format the prompt asks for: full marks when the prediction is the reference answer."""
    chinese = re.search(r"预测答案：(.*)\n参考答案：(.*)\n$", prompt, re.S)
    prediction, answer = (
        chinese.groups()
        if chinese
        else re.search(r"Predicted answer: (.*)\n\nReference answer: (.*)\n\n$", prompt, re.S).groups()
    )
    if "UNPARSEABLE" in prediction:
        return "I would rather not give a score."
    score = "10" if prediction == answer else "7.5"
    if chinese:
        return f"相关性扣0分，完整性扣0分，...，总分是：{score}分。理由：略"
    return f"Content accuracy {score} points, level of detail/completeness {score} points, total score: {score} points"


@pytest.fixture
def judge_server():
    server = FakeJudge()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def config(server: FakeJudge, task: str = "law", **options) -> JudgeConfig:
    return JudgeConfig(server.url, "fake-judge", task, **options)


# --- the reference's prompts and parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(JUDGE_TASKS))
def test_templates_and_patterns_are_the_references(task):
    evaluator = reference_evaluator(task)
    assert JUDGE_TASKS[task].template == evaluator.template
    assert JUDGE_TASKS[task].pattern == evaluator.pattern


@pytest.mark.parametrize("task", sorted(JUDGE_TASKS))
def test_the_reference_asks_and_scores_as_expert_hub_does(task, judge_server, tmp_path):
    """The reference's evaluator, run on the same records against the same judge, sends the same messages and
    max_tokens, and its mean is `value_unparseable_as_zero` (it scores a judgement without a score 0)."""
    predictions = ["判决：驳回", " 判决：支持。\n\nUser: 其余 ", "UNPARSEABLE", "", "   ", "{x}"]
    answers = [["判决：驳回", "another answer"]] * len(predictions)
    evaluator = reference_evaluator(task)
    evaluator.client = OpenAI(base_url=judge_server.url, api_key="unused", max_retries=0)
    samples = [{"raw_prediction": prediction, "raw_answers": refs} for prediction, refs in zip(predictions, answers)]
    reference_scores = evaluator.eval_metric(samples)
    theirs = [request["body"] for request in judge_server.requests]
    judge_server.requests.clear()

    result = judge_scores(predictions, answers, config(judge_server, task, cache=tmp_path / "c.db"))
    ours = [request["body"] for request in judge_server.requests]

    def sent(bodies: list[dict]) -> list[str]:  # the requests but their deliberate differences, model and temperature
        kept = [{key: value for key, value in body.items() if key not in ("model", "temperature")} for body in bodies]
        return sorted({json.dumps(body, ensure_ascii=False, sort_keys=True) for body in kept})

    assert sent(ours) == sent(theirs) and len(ours) == 5  # "" and "   " are both judged as "None", asked once here
    assert ours[0]["messages"][0] == {"role": "system", "content": SYSTEM_MESSAGE}
    assert result["value_unparseable_as_zero"] == pytest.approx(sum(reference_scores) / len(reference_scores))
    assert result["unparseable"] == reference_scores.count(0.0) == 1


@pytest.mark.parametrize(
    ("task", "judgement", "expected"),
    [
        ("summary", "内容准确性扣1分，详细程度/完整性扣0.5分，...，总分是：8.5分", 0.85),
        ("law", "相关性扣0分，完整性扣0分，...，总分是：10分。理由：一致", 1.0),
        ("law", "总分是：6分。复核后总分是：9分", 0.6),  # the first total counts
        ("law", "总分是：0分", 0.0),
        (
            "translation",
            "Content accuracy 9 points, level of detail/completeness 8 points, total score: 8.5 points",
            0.85,
        ),
        ("translation", "total score:7 points", 0.7),
        ("summary", "总分：8分", None),  # not the asked "总分是："
        ("law", "总分是: 8分", None),  # a half-width colon
        ("translation", "Total Score: 8 points", None),  # the pattern is case-sensitive
        ("translation", "total score: 8/10", None),
        ("translation", "", None),
    ],
)
def test_scores_parse_as_the_reference_parses_them(task, judgement, expected):
    assert parse_score(task, judgement) == (pytest.approx(expected) if expected is not None else None)
    reference = reference_evaluator(task).parse_gpt4(judgement)
    assert reference == (expected if expected is not None else 0.0)  # the reference scores "no score" as 0


@pytest.mark.parametrize(
    ("task", "judgement"),
    [("law", "总分是：999分"), ("summary", "总分是：10.5分"), ("translation", "total score: 11 points")],
)
def test_a_total_above_full_marks_is_no_score(task, judgement):
    assert reference_evaluator(task).parse_gpt4(judgement) > 1  # the reference's, on its 0-1 scale
    assert parse_score(task, judgement) is None


@pytest.mark.parametrize("task", sorted(JUDGE_TASKS))
@pytest.mark.parametrize(
    "completion", ["  判决如下。\n\n其余。  ", "   ", "", "the cat.\n\nUser: more", "\n\nlater", "a\nb\n\n\nc", "{x}"]
)
def test_predictions_are_post_processed_as_the_reference_does(task, completion):
    answers = [" 参考 {答案}。", "second answer"]
    prediction, [answer] = reference_evaluator(task).post_process(completion, answers)
    assert judge_prompt(task, completion, answers[0]) == JUDGE_TASKS[task].template.format(
        prediction=prediction, ground_truth=answer
    )


def test_translation_is_judged_on_its_first_paragraph():
    sent = judge_prompt("translation", " the cat.\n\nUser: more ", " a cat ")
    assert "Predicted answer: the cat.\n\nReference answer:  a cat \n\n" in sent
    assert "判决如下。\n\n其余" in judge_prompt("law", "判决如下。\n\n其余", "答案")  # other tasks keep it all


# --- asking the judge ---------------------------------------------------------------------------------------------


def test_judge_scores_retries_counts_unparseable_and_caches(judge_server, registry_home):
    predictions = ["判决：驳回", "判决：支持", "UNPARSEABLE", "FLAKY 判决"]
    answers = [["判决：驳回"], ["判决：驳回"], ["判决：驳回"], ["判决：驳回"]]
    result = judge_scores(predictions, answers, config(judge_server))

    assert result["judged"] == 3 and result["unparseable"] == 1 and result["cached"] == 0
    assert result["value"] == pytest.approx((1.0 + 0.75 + 0.75) / 3)  # the mean of the judgements with a score
    assert result["value_unparseable_as_zero"] == pytest.approx((1.0 + 0.75 + 0.75) / 4)
    assert result["unparseable_judgements"] == [{"index": 2, "judgement": "I would rather not give a score."}]
    assert [j["score"] for j in result["judgements"]] == [1.0, 0.75, None]
    assert len(judge_server.requests) == 5  # four judgements, one of them asked again after a 500
    template = JUDGE_TASKS["law"].template
    assert sorted(set(judge_server.prompts())) == sorted(
        template.format(prediction=p, ground_truth=a[0]) for p, a in zip(predictions, answers)
    )
    assert sum("FLAKY" in prompt for prompt in judge_server.prompts()) == 2  # retried after its 500
    body = judge_server.requests[0]["body"]
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_MESSAGE}
    assert body["model"] == "fake-judge" and body["max_tokens"] == 80 and body["temperature"] == 0
    assert judge_server.requests[0]["authorization"] == "Bearer unused"

    progress = []
    again = judge_scores(predictions, answers, config(judge_server), on_judged=lambda n, total: progress.append(n))
    assert len(judge_server.requests) == 5  # a rerun asks nothing
    assert again["cached"] == 4 and progress == [4]
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in result.items() if k != "cached"}
    assert result["judge_cache"] == str(registry_home / "judge-cache.sqlite")

    other_judge = judge_scores(predictions[:1], answers[:1], JudgeConfig(judge_server.url, "another-judge", "law"))
    assert other_judge["cached"] == 0 and len(judge_server.requests) == 6  # the judge is part of the key


def test_requests_run_concurrently(judge_server, tmp_path):
    judge_server.delay = 0.3
    predictions = [f"answer {i}" for i in range(8)]
    started = time.monotonic()
    result = judge_scores(predictions, [["answer 0"]] * 8, config(judge_server, concurrency=4, cache=tmp_path / "c.db"))
    assert result["judged"] == 8 and result["value"] == pytest.approx((1.0 + 7 * 0.75) / 8)
    assert 1 < judge_server.most_in_flight <= 4
    assert time.monotonic() - started < 8 * 0.3


def test_the_same_request_is_asked_once(judge_server, tmp_path):
    result = judge_scores(["甲", "甲", "乙"], [["甲"], ["甲"], ["甲"]], config(judge_server, cache=tmp_path / "c.db"))
    assert result["judged"] == 3 and result["value"] == pytest.approx((1.0 + 1.0 + 0.75) / 3)
    assert len(judge_server.requests) == 2


def test_the_judge_metric_needs_a_judge():
    with pytest.raises(InvalidInputError, match="the judge metric needs a judge"):
        evaluate_records(None, None, [{"prompt": "q", "answers": ["a"], "messages": None}], "judge")


def test_a_failing_judge_stops_with_one_line_and_a_rerun_resumes(judge_server, tmp_path):
    predictions, answers = ["甲", "乙", "BROKEN"], [["甲"], ["甲"], ["甲"]]
    judge = config(judge_server, concurrency=1, max_retries=1, cache=tmp_path / "cache.sqlite")
    with pytest.raises(InvalidInputError, match=f"the judge at {judge_server.url} failed after 1 retries: .*500"):
        judge_scores(predictions, answers, judge)
    assert len(judge_server.requests) == 4  # two judgements, then BROKEN twice
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgements").fetchone() == (2,)

    judge_server.broken = False
    result = judge_scores(predictions, answers, judge)
    assert result["cached"] == 2 and result["judged"] == 3 and len(judge_server.requests) == 5


def test_the_api_key_comes_from_the_named_variable(judge_server, tmp_path, monkeypatch):
    judge = config(judge_server, key_env="JUDGE_TEST_KEY", cache=tmp_path / "c.db")
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(InvalidInputError, match="JUDGE_TEST_KEY .* is not set"):
        judge_scores(["a"], [["a"]], judge)
    monkeypatch.setenv("JUDGE_TEST_KEY", "s3cret")
    judge_scores(["a"], [["a"]], judge)
    assert judge_server.requests[-1]["authorization"] == "Bearer s3cret"


def test_an_unusable_cache_is_one_clear_error(judge_server, tmp_path):
    (tmp_path / "not-a-db").write_text("plain text, not SQLite\n" * 100)
    with pytest.raises(InvalidInputError, match="cannot use .*not-a-db as the judge cache"):
        judge_scores(["a"], [["a"]], config(judge_server, cache=tmp_path / "not-a-db"))


@pytest.mark.parametrize("kind", BAD_REPLIES)
def test_a_reply_with_no_judgement_is_unparseable_and_not_cached(judge_server, tmp_path, kind):
    """Plain text, broken JSON, a list, a null message, a number for text: counted, with why, and asked again."""
    judge = config(judge_server, cache=tmp_path / "cache.sqlite")
    predictions, answers = ["判决：驳回", f"{kind} 判决"], [["判决：驳回"]] * 2
    result = judge_scores(predictions, answers, judge)
    assert result["judged"] == 1 and result["value"] == 1.0 and result["unparseable"] == 1
    [refused] = result["unparseable_judgements"]
    assert refused["index"] == 1 and refused["refused"].startswith("the reply"), refused
    assert len(judge_server.requests) == 2  # not retried: the judge answered
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgements").fetchone() == (1,)
    assert judge_scores(predictions, answers, judge)["cached"] == 1 and len(judge_server.requests) == 3


def test_a_reply_over_the_cap_is_refused_unread_and_not_cached(judge_server, tmp_path):
    judge = config(judge_server, cache=tmp_path / "cache.sqlite")
    result = judge_scores(["HUGE"], [["判决：驳回"]], judge)
    assert result["unparseable"] == 1 and result["value"] is None
    assert result["unparseable_judgements"] == [{"index": 0, "refused": "the reply is over 1 MiB"}]
    assert (tmp_path / "cache.sqlite").stat().st_size < 100_000
    assert judge_scores(["HUGE"], [["判决：驳回"]], judge)["cached"] == 0
    assert len(judge_server.requests) == 2  # asked again by the rerun, never retried


def test_the_timeout_bounds_each_request_whole(judge_server, tmp_path):
    """A reply trickling in a few bytes every 0.1 s, over 5 s, never pauses as long as the 0.5 s timeout; each try
    still ends at 0.5 s, a timeout is retried, and the run stops after the retries."""
    judge = config(judge_server, max_retries=1, timeout=0.5, cache=tmp_path / "cache.sqlite")
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match="failed after 1 retries: Request timed out"):
        judge_scores(["TRICKLE"], [["判决：驳回"]], judge)
    assert time.monotonic() - started < 4  # two tries of 0.5 s and a backoff
    assert len(judge_server.requests) == 2


# --- the command line ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_with_a_judge_on_the_demo_base(run_cli, judge_server):
    command = ["eval", "--task", "law", "--metric", "judge", "--judge-url", judge_server.url, "--judge-model", "fake"]
    code, out, err = run_cli(*command, "--limit", 4, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["metric"] == "judge" and result["count"] == 4 and result["judged"] + result["unparseable"] == 4
    assert result["judge_task"] == "law" and result["judge_model"] == "fake" and 0.0 <= result["value"] <= 1.0
    assert len(judge_server.requests) == len(set(judge_server.prompts())) == 4
    assert all(prompt.startswith(JUDGE_TASKS["law"].template[:40]) for prompt in judge_server.prompts())

    code, out, err = run_cli(*command, "--limit", 4)
    assert code == 0, err
    assert len(judge_server.requests) == 4  # the rerun is answered from the cache
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    rows = dict(cells)
    assert rows["judge"] == f"{result['value']:.4f}" and rows["unparseable"] == "0" and rows["cached"] == "4"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "law", "--metric", "judge"], "--metric judge needs --judge-url URL and --judge-model NAME"),
        (["--task", "math", "--metric", "judge", "--judge-url", "{url}", "--judge-model", "m"], "task 'math' has no judge prompt"),
        (["--data", "{data}", "--metric", "judge", "--judge-url", "{url}", "--judge-model", "m"], "give --judge-task summary|law|translation"),
        (["--task", "law", "--metric", "judge", "--judge-url", "{url}", "--judge-model", "m", "--judge-key-env", "NO_SUCH_JUDGE_KEY"], "NO_SUCH_JUDGE_KEY (the judge's API key) is not set"),
        (["--task", "law", "--judge-url", "{url}"], "the --judge-* options are for --metric judge"),
    ],
)  # fmt: skip
def test_eval_judge_errors_are_one_line(run_cli, judge_server, tmp_path, args, message):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "问", "raw_answers": ["答"]}) + "\n")
    code, _, err = run_cli("eval", *(arg.format(url=judge_server.url, data=data) for arg in args))
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert judge_server.requests == []


def test_eval_with_a_judge_that_replies_no_judgement_says_so_without_a_traceback(run_cli, judge_server):
    judge_server.bad_reply = "PLAIN"
    command = ["eval", "--task", "law", "--metric", "judge", "--judge-url", judge_server.url, "--judge-model", "fake"]
    code, out, err = run_cli(*command, "--limit", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["unparseable"] == 2 and result["value"] is None and "Traceback" not in err
    assert result["unparseable_judgements"][0]["refused"] == "the reply is no chat completion: '总分是：10分'"
    assert "2 of 2 judgements hold no score" in err
