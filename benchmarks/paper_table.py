"""The paper's Tables 1-3 in miniature, measured on the demo base: ESFT-Token, ESFT-Gate, full fine-tuning and LoRA.

For every held-out built-in task (the demo base never saw law, intent or translation), each method trains with and
without general data mixed in (the built-in `general` task, 1:1, as the paper mixes in alignment data), over
several seeds. Each trained model is scored on its task and on every other built-in task: the mean over the tasks the
base was pretrained on is the general ability it kept (the paper's question), set against the base model's; the other
held-out tasks, which the base scores about 0 on, are reported apart. Trainable parameters, training time, peak
memory and artifact bytes come from the same runs. Each method's learning rate is the best of a small sweep on a
validation split (the held-out share of the training data, never the eval split); an ablation varies p for both
scores, and every task trains its ESFT-Token selection with shared experts / non-expert modules too.

Every run is a fresh process (so its peak memory is its own), `--workers` at a time with one thread each; each
run's figures are kept in `--work`, so an interrupted benchmark resumes where it stopped. The report is
`OUT/paper_table.md` (+ `.json` and `paper_table.png`); `--scale long` trains 100 steps instead of 60 (about an hour
on 2 cores, `paper_table_long.*`), and `--scale quick` is a smoke run of the same code (the tests use it).
Run: `.venv/bin/python benchmarks/paper_table.py [--scale full|long|quick] [--out benchmarks/results] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from paper_report import write_report

from expert_hub.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("esft-token", "esft-gate", "full", "lora")
TASKS = ("law", "intent", "translation")  # the built-in tasks the demo base was not pretrained on
MIX_TASK = "general"  # its conversations stand in for the paper's alignment data
LEARNING_RATES = {  # the sweep, around the demo base's default of 3e-3
    "esft-token": (1e-3, 3e-3, 1e-2),
    "esft-gate": (1e-3, 3e-3, 1e-2),
    "full": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2),
}
TOP_PS = (0.05, 0.1, 0.2, 0.3, 0.5)
# p of the main runs: the demo base's default for token scores; for gate scores that default would take 90% of
# layer 1's gate mass (0.39 on law: 45 of 64 experts), so the gate's is lower, about the paper's ratio (0.2 / 0.1).
MAIN_TOP_P = {"esft-token": 0.35, "esft-gate": 0.15}
SWEEP_TASK = "law"  # the sweep and the ablations train this task
SCALES = {
    "full": dict(seeds=(0, 1, 2), steps=60, batch_size=8, task_records=60, other_records=30, tasks=TASKS),
    "long": dict(seeds=(0, 1, 2), steps=100, batch_size=8, task_records=100, other_records=40, tasks=TASKS),
    "quick": dict(seeds=(0,), steps=2, batch_size=2, task_records=4, other_records=4, tasks=(SWEEP_TASK,)),
}


def run(spec: dict) -> dict:
    """One configuration in this (fresh) process: train it, score it on every built-in task; its figures."""
    import torch

    torch.set_num_threads(1)
    from expert_hub.demo import demo_base
    from expert_hub.errors import ExpertHubError
    from expert_hub.models import load_base
    from expert_hub.training import TrainingConfig, base_training_defaults, train

    started, out = time.perf_counter(), Path(spec["work"]) / spec["name"]
    figures = {"trainable_parameters": 0, "artifact_bytes": 0, "eval_loss": None}
    if spec["method"] is None:
        model = load_base(demo_base())
    else:
        settings = base_training_defaults(demo_base()) | spec["settings"]
        config = TrainingConfig(task=spec["task"], base=demo_base(), out=str(out), method=spec["method"], **settings)
        try:
            result = train(config)
        except ExpertHubError as error:  # a learning rate of the sweep that diverges
            return spec | figures | {"error": str(error), "train_seconds": time.perf_counter() - started}
        model = result.model
        figures = _run_figures(out, result.artifact) | {"eval_loss": result.eval_loss}
    # what training took (loading and ESFT's scoring included) and needed, before scoring adds its own
    figures |= {
        "train_seconds": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if spec["method"] is not None:
        for heavy in (out / "checkpoints", out / "best", result.artifact):  # the figures are taken; disk is not
            shutil.rmtree(heavy, ignore_errors=True)
    return spec | figures | {"scores": _scores(model, spec["evals"])}


def _run_figures(out: Path, artifact: Path) -> dict:
    """What the run trained (from its checkpoint: every method's trainable tensors) and what it ships."""
    from safetensors import safe_open

    checkpoint = next((out / "checkpoints").glob("step-*")) / "trainable.safetensors"
    with safe_open(checkpoint, "pt") as tensors:
        trainable = sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    shipped = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    return {"trainable_parameters": trainable, "artifact_bytes": shipped}


def _scores(model, evals: list[tuple[str, int]]) -> dict[str, float]:
    """`{"task@records": value}`: each built-in task's metric (BLEU as 0-1) on the first records of its eval split."""
    from expert_hub.demo import demo_base
    from expert_hub.evaluation import evaluate_records
    from expert_hub.models import load_tokenizer
    from expert_hub.tasks import BUILTIN_TASKS

    tokenizer = load_tokenizer(demo_base())
    scores = {}
    for name, limit in evals:
        task = BUILTIN_TASKS[name]
        records = task.eval_records(limit)
        value = evaluate_records(
            model, tokenizer, records, task.metric, max_new_tokens=task.max_new_tokens, batch_size=64
        )["value"]
        scores[f"{name}@{limit}"] = value / 100 if task.metric == "bleu" else value
    return scores


class Runner:
    """Runs specs in fresh processes, `workers` at a time; a spec already run (its JSON in `work`) is not rerun."""

    def __init__(self, work: Path, workers: int, scale: dict, data: dict[str, str]):
        self.work, self.workers, self.scale, self.data = work, workers, scale, data

    def spec(self, kind: str, task: str, method: str | None, *, seed=0, mix=False, lr=None, variant="", **extra):
        """A run's description; its name is unique to what it trains, so equal runs are run once."""
        from expert_hub.tasks import BUILTIN_TASKS

        others = [(name, self.scale["other_records"]) for name in BUILTIN_TASKS if name != task]
        settings = dict(
            data=self.data.get(task),
            steps=self.scale["steps"],
            batch_size=self.scale["batch_size"],
            seed=seed,
            learning_rate=lr,
            save_every=self.scale["steps"],
            eval_every=max(self.scale["steps"] // 4, 1),
            keep_checkpoints=1,
            **({"mix_data": self.data[MIX_TASK], "mix_ratio": 1.0} if mix else {}),
            **({"top_p": MAIN_TOP_P[method]} if method in MAIN_TOP_P and "top_p" not in extra else {}),
            **extra,
        )
        parts = (task, method, f"s{seed}", "mix" if mix else "", lr, variant)
        return dict(
            name="-".join(str(part) for part in parts if part not in ("", None)),
            kind=kind,
            task=task,
            method=method,
            seed=seed,
            mix=mix,
            lr=lr,
            variant=variant,
            settings=settings,
            evals=[(task, self.scale["task_records"]), *others],
            work=str(self.work),
        )

    def base_spec(self) -> dict:
        """The base model, scored as every trained model is (its task's records, and every other task's)."""
        from expert_hub.tasks import BUILTIN_TASKS

        spec = self.spec("base", "base", None)
        spec["evals"] = [(t, self.scale["task_records"]) for t in self.scale["tasks"]]
        spec["evals"] += [(name, self.scale["other_records"]) for name in BUILTIN_TASKS]
        return spec

    def run_all(self, specs: list[dict]) -> list[dict]:
        unique = {spec["name"]: spec for spec in specs}
        done = {name: json.loads(self._file(name).read_text()) for name in unique if self._file(name).is_file()}
        todo = [spec for name, spec in unique.items() if name not in done]
        if todo:
            print(f"{len(todo)} runs to go ({len(done)} done before)", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {pool.submit(run, spec): spec["name"] for spec in todo}
            for future in as_completed(futures):
                figures = future.result()
                write_json_atomic(self._file(figures["name"]), figures)  # a kill leaves it whole or absent
                done[figures["name"]] = figures
                print(f"  {figures['name']}: {figures['train_seconds']:.0f}s", flush=True)
        return [done[spec["name"]] for spec in specs]

    def _file(self, name: str) -> Path:
        return self.work / f"{name}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        choices=SCALES,
        default="full",
        help="full: the committed report; long: 100 steps a run; quick: a smoke run (one task, one seed, two steps).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "expert-hub-paper-table",
        help="Where runs and their figures go; rerunning with the same --work resumes.",
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from expert_hub.tasks import export

    quick = args.scale == "quick"
    scale = SCALES[args.scale] | {"sweep_task": SWEEP_TASK, "name": args.scale}
    work = args.work / args.scale
    work.mkdir(parents=True, exist_ok=True)
    data = {name: str(export(name, work / "data" / name)["train"]) for name in (*scale["tasks"], MIX_TASK)}
    runner = Runner(work, args.workers, scale, data)
    started = time.perf_counter()

    # 1. the base model, and each method's learning-rate sweep on the validation split of one task
    sweep_rates = {method: rates[1:2] if quick else rates for method, rates in LEARNING_RATES.items()}
    first = [runner.base_spec()]
    first += [runner.spec("main", SWEEP_TASK, m, lr=lr) for m, rates in sweep_rates.items() for lr in rates]
    results = runner.run_all(first)
    sweep = [r for r in results if r["method"]]
    chosen = {}
    for method in METHODS:
        converged = [r for r in sweep if r["method"] == method and r.get("eval_loss") is not None]
        if not converged:
            raise SystemExit(f"every learning rate of {method} diverged: {LEARNING_RATES[method]}")
        chosen[method] = min(converged, key=lambda r: r["eval_loss"])["lr"]

    # 2. every task, method, mixing and seed at the chosen rates; p for both scores on the sweep task
    main_specs = [
        runner.spec("main", task, method, seed=seed, mix=mix, lr=chosen[method])
        for task in scale["tasks"]
        for method in METHODS
        for mix in (False, True)
        for seed in scale["seeds"]
    ]
    top_ps = TOP_PS[2:3] if quick else TOP_PS
    ablation = [
        runner.spec("top_p", SWEEP_TASK, method, lr=chosen[method], variant=f"p{p}", top_p=p)
        for method in ("esft-token", "esft-gate")
        for p in top_ps
    ]
    results += runner.run_all(main_specs + ablation)

    # 3. each task's ESFT-Token selection with shared experts, or with non-expert modules, trained too: does what
    # ESFT freezes explain its gap to full fine-tuning?
    modules = []
    for task in scale["tasks"]:
        lr = chosen["esft-token"]
        reference = runner.spec("main", task, "esft-token", lr=lr)["name"]
        selection = json.loads((work / reference / "expert_cfg.json").read_text())
        for flag in ("shared_experts", "non_expert_modules"):
            path = work / f"expert_cfg-{task}-{flag}.json"
            path.write_text(json.dumps(selection | {flag: True}))
            modules.append(runner.spec("modules", task, "esft", lr=lr, variant=flag, experts=str(path)))
    results += runner.run_all(modules)

    elapsed = work / "elapsed_seconds"  # over every invocation, so a resumed benchmark reports its whole time
    seconds = time.perf_counter() - started + (float(elapsed.read_text()) if elapsed.is_file() else 0.0)
    elapsed.write_text(f"{seconds:.0f}")
    scale |= {"main_top_p": MAIN_TOP_P, "minutes": round(seconds / 60)}
    print(f"wrote {write_report(results, chosen, scale, args.out)}")


if __name__ == "__main__":
    main()
