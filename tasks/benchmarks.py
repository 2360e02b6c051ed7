"""Stage 6b: lm-eval sweeps on MMLU and BBH, base vs fine-tuned (catastrophic forgetting).

Offline mirrors: each task YAML `include`s lm-eval's own stock YAML (mmlu/default, bbh/fewshot) and
overrides only where the rows come from, so prompts, choices, few-shot examples and metrics are
lm-eval's. One scoring change, for BBH: the generation is whitespace-stripped before exact match.
Rows are converted from the original files with a seeded per-subtask sample.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import write_jsonl
from sftflow.tracking import stage_task


def stock_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _mmlu_subtasks(src: Path) -> list[str]:
    return sorted(p.name.removesuffix("_test.csv") for p in (src / "test").glob("*_test.csv"))


def _mmlu_rows(src: Path, subject: str, split: str) -> list[dict]:
    with (src / split / f"{subject}_{split}.csv").open(encoding="utf-8", newline="") as fh:
        return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())}
                for q, a, b, c, d, ans in csv.reader(fh)]


def _bbh_subtasks(src: Path) -> list[str]:
    return sorted(p.stem for p in src.glob("*.json"))


def _bbh_rows(src: Path, subtask: str, split: str) -> list[dict]:
    return json.loads((src / f"{subtask}.json").read_text(encoding="utf-8"))["examples"]


@dataclass(frozen=True)
class Benchmark:
    folder: str  # under data.root
    metric: str  # lm-eval metric name for items and aggregates
    subtasks: Callable[[Path], list[str]]
    rows: Callable[[Path, str, str], list[dict]]
    stock_yaml: str  # under lm_eval/tasks, {sub} = subtask
    extra_splits: tuple[str, ...] = ()  # copied whole (few-shot source), in file order
    scoring: dict | None = None  # YAML keys added to the stock task; prompts are never touched


# Stock bbh_fewshot compares the raw generation, so " True" never matches "True" and most models score
# 0 (lm-evaluation-harness PR #2502). Score the stripped generation with lm-eval's own filter instead.
_STRIPPED = {"filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                          {"function": "take_first"}]}]}


BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark("mmlu", "acc", _mmlu_subtasks, _mmlu_rows, "mmlu/default/mmlu_{sub}.yaml", ("dev",)),
    "bbh": Benchmark("bbh", "exact_match", _bbh_subtasks, _bbh_rows, "bbh/fewshot/{sub}.yaml", scoring=_STRIPPED),
}


def sample(rows: list[dict], limit: int | None, seed: str) -> list[dict]:
    """A seeded sample that keeps file order (so results line up across runs and models)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def build_mirror(name: str, cfg: BenchmarkConfig, data_root: Path, seed: int, out_dir: Path) -> list[str]:
    """Write data files and task YAMLs for one benchmark; return the task names."""
    bench = BENCHMARKS[name]
    src = data_root / bench.folder
    if not src.is_dir():
        raise FileNotFoundError(f"{name}: source folder {src} not found (set data.root to the shared data folder)")
    available = bench.subtasks(src)
    chosen = available if cfg.subtasks == "all" else cfg.subtasks
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"eval.{name}.subtasks: unknown {unknown}; available: {', '.join(available)}")
    stock = stock_tasks_dir()
    names = []
    for sub in chosen:
        files = {"test": out_dir / name / f"{sub}.test.jsonl"}
        write_jsonl(files["test"], sample(bench.rows(src, sub, "test"), cfg.limit, f"{seed}:{name}:{sub}"))
        for split in bench.extra_splits:
            files[split] = out_dir / name / f"{sub}.{split}.jsonl"
            write_jsonl(files[split], bench.rows(src, sub, split))
        task = f"sftflow_{name}_{sub}"
        spec = {"include": str(stock / bench.stock_yaml.format(sub=sub)), "task": task, "tag": f"sftflow_{name}",
                "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "num_fewshot": cfg.num_fewshot, **(bench.scoring or {})}
        (out_dir / name / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(task)
    return names


def per_item(samples: dict, task_bench: dict[str, str]) -> Iterator[dict]:
    for task, items in samples.items():
        bench = task_bench[task]
        metric = BENCHMARKS[bench].metric
        for s in items:
            yield {"benchmark": bench, "task": task.removeprefix(f"sftflow_{bench}_"), "doc_id": s["doc_id"],
                   "score": float(s[metric])}


def run_lm_eval(model: dict, tasks: list[str], include: Path, cfg: EvalConfig, trust_remote_code: bool) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": model["path"], "dtype": "float32", "trust_remote_code": trust_remote_code}
    if model.get("adapter"):
        model_args["peft"] = model["adapter"]
    return simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, batch_size=cfg.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed)


def aggregate(items: list[dict], tag: str) -> dict[str, float]:
    """Micro-averages per benchmark (as lm-eval's weight_by_size groups) and per subtask."""
    metrics: dict[str, float] = {}
    groups: dict[tuple[str, str | None], list[float]] = {}
    for it in items:
        groups.setdefault((it["benchmark"], None), []).append(it["score"])
        groups.setdefault((it["benchmark"], it["task"]), []).append(it["score"])
    for (bench, task), scores in groups.items():
        metric = BENCHMARKS[bench].metric
        key = f"eval/{tag}/{bench}/{metric}" if task is None else f"eval/{tag}/{bench}/{task}/{metric}"
        metrics[key] = sum(scores) / len(scores)
        if task is None:
            metrics[f"eval/{tag}/{bench}/n"] = len(scores)
    return metrics


def benchmarks(models: dict[str, dict], cfg: EvalConfig, data_root: str, out_dir: Path,
               trust_remote_code: bool = False) -> dict:
    enabled = {name: getattr(cfg, name) for name in BENCHMARKS if getattr(cfg, name).enabled}
    if not enabled:
        return {"metrics": {}, "results": {}}
    mirror = out_dir / "tasks"
    task_bench = {t: name for name, bcfg in enabled.items()
                  for t in build_mirror(name, bcfg, Path(data_root), cfg.seed, mirror)}
    metrics, items = {}, {}
    for tag, spec in models.items():
        start = time.perf_counter()
        res = run_lm_eval(spec, list(task_bench), mirror, cfg, trust_remote_code)
        metrics[f"eval/{tag}/wall_s"] = time.perf_counter() - start
        items[tag] = list(per_item(res["samples"], task_bench))
        write_jsonl(out_dir / f"items_{tag}.jsonl", items[tag])
        metrics.update(aggregate(items[tag], tag))
    if {"base", "ft"} <= items.keys():
        for name in enabled:
            metric = BENCHMARKS[name].metric
            metrics[f"forgetting/{name}/delta"] = metrics[f"eval/ft/{name}/{metric}"] - metrics[f"eval/base/{name}/{metric}"]
    (out_dir / "benchmarks.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics,
            "artifacts": [out_dir / "benchmarks.json", mirror, *(out_dir / f"items_{t}.jsonl" for t in items)]}


benchmarks_task = stage_task(benchmarks, "benchmarks")
