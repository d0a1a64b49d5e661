"""General abilities through lm-evaluation-harness: `lm_eval_scores` and `expert-hub eval --lm-eval`.

A multiple-choice task is written here with its data in a local JSONL file (no Hub). Its gold answers are the
tiny base model's own choices, found from the model's logits in this file, so lm-eval must report an accuracy of
exactly 1 on that model; with an adapter, exactly the share of items on which the adapted model, scored here the
same way, still picks the base's choice.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from expert_hub import ExpertAdapter, ExpertSelection, load_model
from expert_hub.demo import demo_base
from expert_hub.errors import InvalidInputError
from expert_hub.families import moe_layers
from expert_hub.general_eval import LMEvalTasks, _scores, lm_eval_scores
from expert_hub.models import load_base, load_tokenizer
from expert_hub.testing import build_tiny_model

pytestmark = pytest.mark.slow  # lm-evaluation-harness runs: `make test-fast` leaves it out

TASK = "expert_hub_tiny_mc"
PROMPT = "Question: {question}\nAnswer:"  # the task's doc_to_text; lm-eval puts " " before the choice
ITEMS = [
    ("2 + 2 =", ["4", "5", "22"]),
    ("The sky is", ["blue", "green", "loud"]),
    ("The capital of France is", ["Berlin", "Paris", "Rome", "Madrid"]),
    ("3 * 3 =", ["6", "9", "33"]),
    ("The opposite of hot is", ["cold", "warm", "big"]),
    ("1 + 1 =", ["3", "11", "2"]),
    ("Water is", ["dry", "wet", "red", "square"]),
    ("A cat says", ["woof", "moo", "meow"]),
]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@torch.no_grad()
def _choices(model, tokenizer) -> list[int]:
    """Each item's choice with the highest log-likelihood after the prompt, from the model's logits over every
    prompt + choice (one right-padded batch)."""
    sequences, starts = [], []
    for question, choices in ITEMS:
        context = PROMPT.format(question=question)
        sequences += [tokenizer.encode(f"{context} {choice}") for choice in choices]
        starts += [len(tokenizer.encode(context))] * len(choices)
    width = max(map(len, sequences))
    ids = torch.tensor([sequence + [0] * (width - len(sequence)) for sequence in sequences])
    mask = torch.tensor([[1] * len(sequence) + [0] * (width - len(sequence)) for sequence in sequences])
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    likelihoods = iter(
        sum(logprobs[row, position - 1, sequence[position]].item() for position in range(start, len(sequence)))
        for row, (sequence, start) in enumerate(zip(sequences, starts))
    )
    picks = []
    for _, choices in ITEMS:
        item = [next(likelihoods) for _ in choices]
        picks.append(item.index(max(item)))
    return picks


def _accuracy(picks: list[int], gold: list[int]) -> float:
    return sum(pick == answer for pick, answer in zip(picks, gold)) / len(picks)


def _write_task(directory: Path, name: str, gold: list[int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    with data.open("w") as lines:
        for (question, choices), answer in zip(ITEMS, gold):
            lines.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(task=name, data=data.resolve()))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny base, the task built on its own choices, and lm-eval's index of it (built once: it takes seconds)."""
    root = tmp_path_factory.mktemp("lm_eval")
    base_dir = build_tiny_model("qwen2_moe", root / "model")
    base, tokenizer = load_model(str(base_dir)), load_tokenizer(str(base_dir))
    gold = _choices(base, tokenizer)
    tasks_dir = _write_task(root / "tasks", TASK, gold)
    (tasks_dir / "needs_the_hub.yaml").write_text(
        TASK_YAML.format(task="needs_the_hub", data="x.jsonl").replace("dataset_path: json", "dataset_path: org/data")
    )
    return dict(
        base_dir=base_dir,
        base=base,
        tokenizer=tokenizer,
        gold=gold,
        tasks_dir=tasks_dir,
        tasks=LMEvalTasks.find([TASK], tasks_dir),
    )


def test_lm_eval_scores_the_models_own_loglikelihood_choices(tiny):
    assert len(set(tiny["gold"])) > 1  # the gold answers are not one position that a fixed pick would match
    scores = lm_eval_scores(tiny["base"], tiny["tokenizer"], tiny["tasks"], batch_size=4)
    assert scores == {TASK: {"acc": 1.0, "acc_stderr": 0.0, "samples": len(ITEMS), "num_fewshot": 0}}


def _expert_adapter(base_dir: Path, path: Path) -> Path:
    """Every routed expert replaced by noise, as no training would leave them: the choices must move."""
    base = load_base(str(base_dir))
    selection = ExpertSelection({layer.index: list(range(layer.num_experts)) for layer in moe_layers(base)})
    adapter = ExpertAdapter.from_model(base, selection, task="law", method="esft-token")
    generator = torch.Generator().manual_seed(1)
    adapter.tensors = {key: torch.randn(t.shape, generator=generator) for key, t in adapter.tensors.items()}
    return adapter.save(path)


def _lora_adapter(base_dir: Path, path: Path) -> Path:
    """A PEFT LoRA adapter with random weights (PEFT's default starts B at zero, which changes nothing)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    get_peft_model(load_base(str(base_dir)), config).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["expert", "lora"])
def test_lm_eval_scores_the_model_with_its_adapter_applied(tiny, tmp_path, kind):
    make = _expert_adapter if kind == "expert" else _lora_adapter
    model = load_model(str(tiny["base_dir"]), make(tiny["base_dir"], tmp_path / kind))
    assert isinstance(model, PeftModel) == (kind == "lora")
    expected = _accuracy(_choices(model, tiny["tokenizer"]), tiny["gold"])
    assert expected < 1.0  # the adapter moves some choice away from the base's
    scores = lm_eval_scores(model, tiny["tokenizer"], tiny["tasks"], batch_size=3)
    assert scores[TASK]["acc"] == pytest.approx(expected)


def test_task_data_that_needs_the_hub_fails_with_one_clear_line(tiny):
    tasks = dataclasses.replace(tiny["tasks"], names=("needs_the_hub",))  # HF_HUB_OFFLINE=1 (conftest): no Hub
    with pytest.raises(InvalidInputError, match=r"cannot load the data of lm-eval task\(s\) needs_the_hub: .*Hub"):
        lm_eval_scores(tiny["base"], tiny["tokenizer"], tasks)


def test_eval_cli_reports_lm_eval_scores_on_the_demo_base(run_cli, tiny, tmp_path, monkeypatch):
    """As a user runs it: no --base (the demo base), the task from --lm-eval-include, --limit, --json."""
    demo_choices = _choices(load_model(demo_base()), load_tokenizer(demo_base()))
    expected = _accuracy(demo_choices[:5], tiny["gold"][:5])
    code, out, err = run_cli("eval", "--lm-eval", TASK, "--lm-eval-include", tiny["tasks_dir"], "--limit", 5, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert "metric" not in result and result["base"] == demo_base()  # --lm-eval alone: no task-data evaluation
    assert result["lm_eval"][TASK]["acc"] == pytest.approx(expected)
    assert result["lm_eval"][TASK]["samples"] == 5 and result["lm_eval"][TASK]["num_fewshot"] == 0

    conversations = tmp_path / "eval.jsonl"
    conversations.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c[0]}]}) + "\n"
            for q, c in ITEMS
        )
    )
    # The run above found the task for real; this one takes the index already built (building one takes seconds).
    monkeypatch.setattr(LMEvalTasks, "find", classmethod(lambda cls, names, include_path=None: tiny["tasks"]))
    code, out, err = run_cli(
        "eval", "--data", conversations, "--lm-eval", TASK, "--lm-eval-include", tiny["tasks_dir"], "--limit", 2
    )
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if "│" in line}
    assert float(rows["loss"]) > 0 and rows["count"] == "2"  # with --data, both run, into one table
    assert rows[f"{TASK} acc"].startswith(f"{_accuracy(demo_choices[:2], tiny['gold'][:2]):.4f} ± ")
    assert rows[f"{TASK} samples"] == "2, 0-shot"


def test_an_unknown_task_fails_before_the_model_loads(run_cli, tiny, tmp_path):
    code, _, err = run_cli(
        "eval",
        "--base",
        tmp_path / "no-model",
        "--lm-eval",
        "expert_hub_tiny_m",
        "--lm-eval-include",
        tiny["tasks_dir"],
    )
    assert code == 1
    assert (
        err.startswith(f"error: unknown lm-eval task 'expert_hub_tiny_m' (did you mean {TASK}")
        and "lm-eval ls tasks" in err
    )


def test_without_lm_eval_installed_the_error_says_how_to_install_it(run_cli, monkeypatch):
    for name in {"lm_eval", *(name for name in sys.modules if name.startswith("lm_eval."))}:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval` now fails as if it were not installed
    code, _, err = run_cli("eval", "--lm-eval", "hellaswag")
    assert (code, err) == (1, "error: lm-eval is not installed: pip install 'expert-hub[lm-eval]'\n")


def test_lm_eval_options_need_lm_eval(run_cli):
    code, _, err = run_cli("eval", "--task", "law", "--num-fewshot", 2)
    assert code == 1 and "--num-fewshot and --lm-eval-include are for --lm-eval TASKS" in err


def test_filtered_metrics_keep_lm_evals_filter_name_and_stderrs_pair_with_their_metric():
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.1,
                "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A",
            }
        },
        "n-samples": {"gsm8k": {"original": 1319, "effective": 8}},
        "n-shot": {"gsm8k": 5},
    }
    assert _scores(results) == {
        "gsm8k": {
            "exact_match,strict-match": 0.25,
            "exact_match,strict-match_stderr": 0.1,
            "exact_match,flexible-extract": 0.5,
            "samples": 8,
            "num_fewshot": 5,
        }
    }
