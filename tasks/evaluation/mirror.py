"""The per-run lm-eval tasks: offline mirrors of MMLU and BBH generated from the originals, and stock task names.

Each mirror task YAML `include`s lm-eval's own stock YAML (mmlu/default, bbh/fewshot) and overrides only where
the rows come from, so prompts, choices, few-shot examples and metrics are lm-eval's; the benchmark's registry
entry (mirrors.py) says where the originals are, how rows are read and what scoring is added. Test rows are a
seeded per-subtask sample; few-shot sources are copied whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftflow import cache
from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import write_jsonl
from sftflow.tasks.evaluation.mirrors import BENCHMARKS, check, stock_tasks_dir, unknown_subtasks


@dataclass(frozen=True)
class EvalTask:
    """One lm-eval task of the sweep: a generated mirror or a stock task name."""

    name: str  # the lm-eval task name
    benchmark: str  # what it aggregates under (mmlu, bbh, or the configured stock name)
    subtask: str
    category: str | None  # lm-eval's group (mmlu_stem, ...), read from the stock YAML's tag
    fingerprint: str  # content hash of everything that defines the task's prompts and items
    stock: bool = False  # a stock lm-eval name (data from the hub), not a generated mirror


def sample(rows: list[dict], limit: int | None, seed: str) -> list[dict]:
    """A seeded sample that keeps file order (so results line up across runs and models)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def stock_category(stock_yaml: Path) -> str | None:
    """lm-eval's own grouping of a subtask: mmlu_anatomy's tag `mmlu_stem_tasks` -> `mmlu_stem`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tag = load_yaml(stock_yaml, resolve_func=False, recursive=False).get("tag")
    return tag.removesuffix("_tasks") if isinstance(tag, str) else None


def build_mirror(name: str, cfg: BenchmarkConfig, benchmark_root: Path, seed: int, out_dir: Path) -> list[EvalTask]:
    """Write data files and task YAMLs for one benchmark (originals read under eval.benchmark_root)."""
    bench = BENCHMARKS[name]
    if problem := unknown_subtasks(name, cfg.subtasks):
        raise ValueError(problem)
    check(benchmark_root, {name: cfg.subtasks})  # checked with the config too; files can vanish since
    src = benchmark_root / bench.folder
    chosen = bench.subtasks(cfg.subtasks)
    stock = stock_tasks_dir()
    tasks = []
    for sub in chosen:
        files = {"test": out_dir / name / f"{sub}.test.jsonl"}
        write_jsonl(files["test"], sample(bench.rows(src, sub, "test"), cfg.limit, f"{seed}:{name}:{sub}"))
        for split in bench.extra_splits:
            files[split] = out_dir / name / f"{sub}.{split}.jsonl"
            write_jsonl(files[split], bench.rows(src, sub, split))
        task = f"sftflow_{name}_{sub}"
        stock_yaml = stock / bench.stock_yaml.format(sub=sub)
        spec = {"include": str(stock_yaml), "task": task, "tag": f"sftflow_{name}",
                "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "num_fewshot": cfg.num_fewshot, **(bench.scoring or {})}
        (out_dir / name / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        fingerprint = cache.key(stock_yaml, files, bench.scoring, cfg.num_fewshot)
        tasks.append(EvalTask(task, name, sub, stock_category(stock_yaml), fingerprint))
    return tasks


def stock_tasks(names: list[str], limit: int | None) -> list[EvalTask]:
    """Stock lm-eval tasks/groups by name; their data comes from the hub (online users)."""
    return [EvalTask(n, n, n, None, cache.key("stock", n, limit), stock=True) for n in names]


def sweep_tasks(cfg: EvalConfig, mirror: Path) -> list[EvalTask]:
    tasks = [t for name in BENCHMARKS if getattr(cfg, name).enabled
             for t in build_mirror(name, getattr(cfg, name), Path(cfg.benchmark_root), cfg.seed, mirror)]
    return tasks + stock_tasks(cfg.tasks, cfg.tasks_limit)
