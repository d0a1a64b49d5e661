r"""LLM-judge scoring of free-text answers: the paper's metric for its summary, law and translation tasks.

Ported from deepseek-ai/ESFT `benchmarks.py` (`GPT4Evaluator` and its `SummaryEvaluator`, `LawEvaluator` and
`TranslationEvaluator`) so that scores compare with the paper's. As there:
- the judge is sent the reference's system message and its task template, verbatim (below), formatted with the
  prediction and the first reference answer, with `max_tokens=80`;
- the prediction is the completion stripped, or "None" when empty; for translation only the text before its first
  blank line ("\n\n"). The reference's `pred.strip(".。")` discards its result, so full stops stay here too;
- the score is the first match of the task's pattern in the judgement (`总分是：x分`, `score: x points`) divided by
  10.

Deliberate differences:
- a judgement with no score is counted (`unparseable`) and left out of `value`, the mean of the scores found; the
  reference scores it 0 and prints a line, so its number is `value_unparseable_as_zero`. A total above the 10 points
  every template asks for is no score either (the reference would count `总分是：999分` as 99.9 on its 0-1 scale);
- a reply that holds no judgement (not JSON, not a chat completion, no text in its message) or is over
  MAX_REPLY_BYTES is refused: counted as unparseable, with why, and not cached, so that a rerun asks again (the
  reference scores the first 0 after its 5 tries and takes the second);
- a request still failing after the retries stops the run with an error (the judgements obtained stay cached);
  the reference scores it 0 after 5 tries;
- any OpenAI-compatible endpoint and model, not Azure's `gpt-4-1106-preview`; temperature 0 (the reference leaves
  the API's default) so that a judgement is repeatable and worth caching; the openai client's exponential backoff
  (4 retries: the reference's 5 tries) in place of a fixed 10 s sleep;
- `timeout` bounds each request whole, its reply read to the end: httpx's timeouts bound each network read, so a
  judge trickling its reply a byte at a time could hold a request for as long as it liked.

Judgements are cached in SQLite under a hash of the whole request (URL, model, messages, sampling settings; the
prompt holds both the prediction and the answer), so a rerun sends only what it has not asked before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2

from .errors import InvalidInputError
from .io import first_line

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

SYSTEM_MESSAGE = "You are a helpful assistant. Follow the user's instructions carefully. Respond using markdown."
MAX_TOKENS = 80
TEMPERATURE = 0.0
FULL_MARKS = 10  # what every template scores out of
MAX_REPLY_BYTES = 2**20  # a reply of MAX_TOKENS is a few kB
RETRIED_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))  # what the openai client retries

# The reference's templates, verbatim (trailing spaces included).
SUMMARY_TEMPLATE = """
请你进行以下电话总结内容的评分。请依据以下标准综合考量，以确定预测答案与标准答案之间的一致性程度。满分为10分，根据预测答案的准确性、完整性和相关性来逐项扣分。请先给每一项打分并给出总分，再给出打分理由。总分为10分减去每一项扣除分数之和，最低可扣到0分。请以“内容准确性扣x分，详细程度/完整性扣x分，...，总分是：x分"为开头。

1. **内容准确性**：
   - 预测答案是否准确反映了客户问题或投诉的核心要点。
   - 是否有任何关键信息被错误陈述或误解。

2. **详细程度/完整性**：
   - 预测答案中包含的细节是否充分，能否覆盖标准答案中所有重要点。
   - 对于任何遗漏的关键信息，应相应减分。

3. **内容冗余度**：
   - 预测答案是否简洁明了，和标准答案风格一致，不存在冗余信息。
   - 如果预测答案过长或与标准答案风格不一致，需相应减分。

4. **行动指令正确性**：
   - 预测答案对后续处理的建议或请求是否与标准答案相符。
   - 如果处理建议发生改变或丢失，需相应减分。

预测答案：{prediction}
参考答案：{ground_truth}
"""

LAW_TEMPLATE = """
请你进行以下法案判决预测内容的评分。请依据以下标准综合考量，以确定预测答案与标准答案之间的一致性程度。满分为10分，根据预测答案的准确性、完整性和相关性来逐项扣分。请先给每一项打分并给出总分，再给出打分理由。总分为10分减去每一项扣除分数之和，最低可扣到0分。请以“相关性扣x分，完整性扣x分，...，总分是：x分"为开头。

1. **相关性**：预测答案与标准答案的相关程度是最重要的评分标准。如果预测的判决情况与标准答案完全一致，即所有事实和结果都被精确复制或以不同但等效的方式表述，则应给予高分。若只有部分一致或存在偏差，则根据一致的程度适当扣分。如果没有预测判决内容，扣10分。

2. **完整性**：评估预测答案是否涵盖了所有标准答案中提到的关键点，包括但不限于当事人、具体金额、责任判定、费用承担等。如果遗漏重要信息，则应相应扣分。

3. **准确性**：检查预测答案中提及的细节、数字、日期和法律依据是否与标准答案保持一致。任何错误信息均需扣分，并且严重错误应该导致更多的扣分。

4. **客观性与专业性**：预测答案应客观反映法案内容并使用恰当的法律术语。主观臆断或非专业表达需酌情扣分。
   
预测答案：{prediction}
参考答案：{ground_truth}
"""  # noqa: W293 (the reference's blank line of three spaces)

TRANSLATION_TEMPLATE = """
You are an expert master in machine translation. Please score the predicted answer against the standard answer out of 10 points based on the following criteria:

Content accuracy: Does the predicted answer accurately reflect the key points of the reference answer?
Level of detail/completeness: Does the predicted answer cover all important points from the standard answer?
Content redundancy: Is the predicted answer concise and consistent with the style of the standard answer?

Respond following the format:"Content accuracy x points, level of detail/completeness x points, ..., total score: x points". The total score is the average of all the scores. Do not give reasons for your scores.

Predicted answer: {prediction}

Reference answer: {ground_truth}

"""


@dataclass(frozen=True)
class JudgePrompt:
    template: str  # formatted with `prediction` and `ground_truth`
    pattern: str  # its first group is the total score out of 10
    first_paragraph: bool  # judge only the prediction's text before its first blank line


_CHINESE_TOTAL = r"总分是：(\d+\.\d+|\d+)分"

JUDGE_TASKS: dict[str, JudgePrompt] = {
    "summary": JudgePrompt(SUMMARY_TEMPLATE, _CHINESE_TOTAL, first_paragraph=False),
    "law": JudgePrompt(LAW_TEMPLATE, _CHINESE_TOTAL, first_paragraph=False),
    "translation": JudgePrompt(TRANSLATION_TEMPLATE, r"score: *?(\d+\.\d+|\d+) *?point", first_paragraph=True),
}
"""The reference's judged tasks. The built-in tasks of the same names use these prompts; the others have none."""


@dataclass(frozen=True)
class JudgeConfig:
    """Which judge to ask and how. `key_env` names the environment variable that holds the API key; without one a
    dummy key is sent, which local OpenAI-compatible servers accept."""

    url: str  # an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    task: str  # a key of JUDGE_TASKS: which template and score pattern
    key_env: str | None = None
    concurrency: int = 8
    max_retries: int = 4
    timeout: float = 120.0  # seconds per request, its whole reply included
    cache: Path | None = None  # default: judge-cache.sqlite in the expert-hub home

    def __post_init__(self) -> None:
        if self.task not in JUDGE_TASKS:
            raise InvalidInputError(f"no judge prompt for task {self.task!r}; judged tasks: {', '.join(JUDGE_TASKS)}")
        if self.concurrency < 1 or self.max_retries < 0:
            raise InvalidInputError("the judge needs a concurrency of at least 1 and a retry count of at least 0")

    def api_key(self) -> str:
        """The key to send; a variable that was named but is unset is an error (sending none would fail later)."""
        if self.key_env is None:
            return "unused"
        if not os.environ.get(self.key_env):
            raise InvalidInputError(f"the environment variable {self.key_env} (the judge's API key) is not set")
        return os.environ[self.key_env]

    def cache_path(self) -> Path:
        from .registry.store import default_root

        return Path(self.cache) if self.cache is not None else default_root() / "judge-cache.sqlite"


def judge_prompt(task: str, prediction: str, answer: str) -> str:
    """The user message the reference sends for `task`: its post-processed prediction against `answer`."""
    prompt = JUDGE_TASKS[task]
    text = prediction.strip()
    if prompt.first_paragraph:
        text = text.split("\n\n")[0]
    return prompt.template.format(prediction=text or "None", ground_truth=answer)


def parse_score(task: str, judgement: str) -> float | None:
    """The judgement's total score scaled to 0-1 (the first match of the task's pattern, / 10); None when absent or
    above the template's full marks, which would put a score above 1."""
    found = re.findall(JUDGE_TASKS[task].pattern, judgement)
    return float(found[0]) / FULL_MARKS if found and float(found[0]) <= FULL_MARKS else None


def judge_scores(
    predictions: list[str],
    answers: list[list[str]],
    config: JudgeConfig,
    on_judged: Callable[[int, int], None] | None = None,
) -> dict:
    """Judge each prediction against its first answer; `value` is the mean score (0-1) of the judgements that have
    one, and `unparseable` counts the others (refused replies included), so that a judge off its format shows
    instead of lowering the score.

    `on_judged(count, total)` is called as judgements come in, the cached ones first.
    """
    prompts = [judge_prompt(config.task, prediction, refs[0]) for prediction, refs in zip(predictions, answers)]
    keys = [_request_key(config, prompt) for prompt in prompts]
    uses = Counter(keys)  # the same prediction for the same answer is asked once
    report = (lambda count: on_judged(count, len(keys))) if on_judged else (lambda count: None)
    refused: dict[str, str] = {}  # why each refused reply was refused
    with JudgementCache(config.cache_path()) as cache:
        judgements = {key: text for key in uses if (text := cache.get(key)) is not None}
        cached = sum(uses[key] for key in judgements)
        report(cached)
        missing = {key: prompt for key, prompt in zip(keys, prompts) if key not in judgements}
        if missing:
            _ask_judge(config, missing, cache, judgements, refused, lambda key: report(uses[key]))
    scores = [parse_score(config.task, judgements[key]) if key in judgements else None for key in keys]
    found = [score for score in scores if score is not None]
    unparseable = [index for index, score in enumerate(scores) if score is None]

    def shown(key: str) -> dict[str, str]:
        return {"judgement": judgements[key]} if key in judgements else {"refused": refused[key]}

    return {
        "value": sum(found) / len(found) if found else None,
        "judged": len(found),
        "unparseable": len(unparseable),
        "value_unparseable_as_zero": sum(found) / len(scores) if scores else None,  # the reference's number
        "cached": cached,
        "judge_task": config.task,
        "judge_model": config.model,
        "judge_url": config.url,
        "judge_cache": str(config.cache_path()),
        "judgements": [{"score": score} | shown(key) for key, score in list(zip(keys, scores))[:3]],
        "unparseable_judgements": [{"index": index} | shown(keys[index]) for index in unparseable[:3]],
    }


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]


def _request_key(config: JudgeConfig, prompt: str) -> str:
    """A hash of everything that decides the judgement: where it is asked, of which model, with what."""
    request = {
        "url": config.url.rstrip("/"),
        "model": config.model,
        "messages": _messages(prompt),
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
    }
    return hashlib.sha256(json.dumps(request, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


class _RefusedReply(Exception):
    """A reply from the judge that holds no judgement to score or cache; the message says why."""


def _ask_judge(
    config: JudgeConfig,
    prompts: dict[str, str],
    cache: JudgementCache,
    judgements: dict[str, str],
    refused: dict[str, str],
    on_answer: Callable[[str], None],
) -> None:
    """Ask for every prompt, `config.concurrency` at a time, into `judgements`, or into `refused` with why. Each
    judgement is cached as it arrives, so a failed or interrupted run loses none it received; the openai client
    retries rate limits, server errors, lost connections and timeouts with exponential backoff, and what still fails
    stops the run (the requests under way are dropped)."""
    from openai import APIError, APIStatusError

    try:
        asyncio.run(_ask_all(config, prompts, cache, judgements, refused, on_answer))
    except APIError as error:
        retried = not isinstance(error, APIStatusError) or error.status_code in RETRIED_STATUSES
        failure = f"failed after {config.max_retries} retries" if retried else "refused the request"
        raise InvalidInputError(
            f"the judge at {config.url} {failure}: {first_line(error)} "
            "(the judgements received are cached: a rerun asks only for the others)"
        ) from error
    except sqlite3.Error as error:
        raise InvalidInputError(f"cannot write the judge cache {cache.path}: {first_line(error)}") from error


async def _ask_all(
    config: JudgeConfig,
    prompts: dict[str, str],
    cache: JudgementCache,
    judgements: dict[str, str],
    refused: dict[str, str],
    on_answer: Callable[[str], None],
) -> None:
    """`_ask_judge` in asyncio, which can end a request at its deadline wherever it is (threads cannot)."""
    from openai import AsyncOpenAI, DefaultAsyncHttpx2Client

    api_key = config.api_key()
    limit = asyncio.Semaphore(config.concurrency)
    http_client = DefaultAsyncHttpx2Client(transport=_WholeReplyTransport(config.timeout))
    async with AsyncOpenAI(
        base_url=config.url,
        api_key=api_key,
        max_retries=config.max_retries,
        timeout=config.timeout,
        http_client=http_client,
    ) as client:

        async def ask(key: str, prompt: str) -> None:
            async with limit:
                try:
                    reply = await client.chat.completions.with_raw_response.create(
                        model=config.model, messages=_messages(prompt), max_tokens=MAX_TOKENS, temperature=TEMPERATURE
                    )
                    judgements[key] = _judgement(reply.http_response)
                except _RefusedReply as why:
                    refused[key] = str(why)
            if judgements.get(key):  # an empty reply (a refusal, a content filter) is asked again on the next run
                cache.put(key, prompt, judgements[key], config)
            on_answer(key)

        tasks = [asyncio.create_task(ask(key, prompt)) for key, prompt in prompts.items()]
        try:
            await asyncio.gather(*tasks)
        finally:  # after a failure, nothing new is sent and the requests under way are dropped
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _judgement(reply: httpx2.Response) -> str:
    """The text of a chat-completion reply, `choices[0].message.content`, read from its JSON: the openai client
    parses a reply of any other shape into a string, a list or a half-empty object without a word. The other fields
    are not checked, as OpenAI-compatible servers differ in them."""
    try:
        content = reply.json()["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        raise _RefusedReply(f"the reply is no chat completion: {reply.text[:80]!r}") from None
    if not isinstance(content, str):
        raise _RefusedReply(f"the reply's message holds no text: {json.dumps(content)[:80]}")
    return content


class _WholeReplyTransport(httpx2.AsyncBaseTransport):
    """Ends each HTTP request `seconds` after it starts, its whole reply read, and refuses a reply over
    MAX_REPLY_BYTES (decompressed) as it comes in: httpx's timeouts bound each network read, not the request, so a
    judge trickling its reply a byte every few seconds would hold a request for minutes, and a runaway reply would be
    read whole, however large.

    Requests go through a plain client of their own, so proxies and certificates come from the environment as
    without this transport."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._client = httpx2.AsyncClient()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            async with asyncio.timeout(self._seconds):
                response = await self._client.send(request, stream=True)
                try:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_REPLY_BYTES:  # the openai client passes it on as it is, unretried
                            raise _RefusedReply(f"the reply is over {MAX_REPLY_BYTES // 2**20} MiB")
                finally:
                    await response.aclose()
        except TimeoutError:
            raise httpx2.ReadTimeout(f"no whole reply in {self._seconds:g} s", request=request) from None
        headers = [  # the body is decompressed now, its length set anew
            (name, value)
            for name, value in response.headers.multi_items()
            if name not in ("content-encoding", "content-length")
        ]
        return httpx2.Response(
            response.status_code, headers=headers, content=bytes(body), extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self._client.aclose()


class JudgementCache:
    """Judgements by request key in SQLite, committed one by one; the asking threads share it under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=60)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, model TEXT NOT NULL, url TEXT NOT NULL,"
                " prompt TEXT NOT NULL, judgement TEXT NOT NULL, created REAL NOT NULL)"
            )
        except (OSError, sqlite3.Error) as error:
            self.close()
            raise InvalidInputError(f"cannot use {path} as the judge cache: {first_line(error)}") from error

    def get(self, key: str) -> str | None:
        with self._lock:
            assert self._db is not None, "the judge cache is closed"
            row = self._db.execute("SELECT judgement FROM judgements WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, prompt: str, judgement: str, config: JudgeConfig) -> None:
        with self._lock:
            assert self._db is not None, "the judge cache is closed"
            self._db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?)",
                (key, config.model, config.url, prompt, judgement, time.time()),
            )
            self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> JudgementCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
