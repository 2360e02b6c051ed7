"""The per-run lm-eval tasks: offline mirrors of MMLU and BBH generated from the originals, and stock task names.

Each mirror task YAML `include`s lm-eval's own stock YAML (mmlu/default, bbh/fewshot) and overrides only where
the rows come from, so prompts, choices, few-shot examples and metrics are lm-eval's; the benchmark's registry
entry (catalog.py) says where the originals are, how rows are read and what scoring is added. Test rows are a
seeded per-subtask sample; few-shot sources are copied whole.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftflow import cache, stats
from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import write_jsonl
from sftflow.tasks.evaluation.catalog import BENCHMARKS, check, stock_tasks_dir, unknown_subtasks

log = logging.getLogger("sftflow.eval")


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


def limit_for_mde(sizes: list[int], mde: float, discordance: float, alpha: float = 0.05) -> int | None:
    """The smallest per-subtask limit whose items (each subtask capped at its size) give the benchmark's
    paired comparison an MDE of at most `mde` at 80% power; None (every item) when even all are too few."""
    need = stats.items_for_mde(mde, discordance, alpha)
    if sum(sizes) < need:
        return None
    low, high = 1, max(sizes)
    while low < high:  # items grow with the limit: bisect
        mid = (low + high) // 2
        low, high = (mid + 1, high) if sum(min(mid, s) for s in sizes) < need else (low, mid)
    return low


def _limit(name: str, cfg: BenchmarkConfig, sizes: list[int], alpha: float) -> int | None:
    if cfg.mde is None:
        return cfg.limit
    limit = limit_for_mde(sizes, cfg.mde, cfg.assumed_discordance, alpha)
    items = sum(sizes if limit is None else (min(limit, s) for s in sizes))
    reached = stats.paired_mde(items, cfg.assumed_discordance, alpha)
    log.log(logging.INFO if reached <= cfg.mde else logging.WARNING,
            "eval.%s.mde %.3f (assumed discordance %.2f): %s items per subtask, %d in all, MDE %.3f",
            name, cfg.mde, cfg.assumed_discordance, limit or "all", items, reached)
    return limit


def _generation(stock_yaml: Path, name: str, cfg: BenchmarkConfig) -> dict:
    """The stock generation settings (stop sequences included) with the configured budget; YAML `include`
    replaces a top-level key whole, so the mirror repeats the stock ones beside max_gen_toks."""
    if cfg.max_gen_toks is None:
        return {}
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(stock_yaml, resolve_func=False, recursive=True).get("generation_kwargs")
    if stock is None:
        raise ValueError(f"eval.{name}.max_gen_toks: {name} scores choices by likelihood and generates nothing")
    return {"generation_kwargs": {**stock, "max_gen_toks": cfg.max_gen_toks}}


def stock_category(stock_yaml: Path) -> str | None:
    """lm-eval's own grouping of a subtask: mmlu_anatomy's tag `mmlu_stem_tasks` -> `mmlu_stem`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tag = load_yaml(stock_yaml, resolve_func=False, recursive=False).get("tag")
    return tag.removesuffix("_tasks") if isinstance(tag, str) else None


def build_mirror(name: str, cfg: BenchmarkConfig, benchmark_root: Path, seed: int, out_dir: Path,
                 alpha: float = 0.05) -> list[EvalTask]:
    """Write data files and task YAMLs for one benchmark (originals read under eval.benchmark_root)."""
    bench = BENCHMARKS[name]
    if problem := unknown_subtasks(name, cfg.subtasks):
        raise ValueError(problem)
    check(benchmark_root, {name: cfg.subtasks})  # checked with the config too; files can vanish since
    src = benchmark_root / bench.folder
    chosen = bench.subtasks(cfg.subtasks)
    stock = stock_tasks_dir()
    rows = {sub: bench.rows(src, sub, "test") for sub in chosen}
    limit = _limit(name, cfg, [len(r) for r in rows.values()], alpha)
    tasks = []
    for sub in chosen:
        files = {"test": out_dir / name / f"{sub}.test.jsonl"}
        write_jsonl(files["test"], sample(rows[sub], limit, f"{seed}:{name}:{sub}"))
        for split in bench.extra_splits:
            files[split] = out_dir / name / f"{sub}.{split}.jsonl"
            write_jsonl(files[split], bench.rows(src, sub, split))
        task = f"sftflow_{name}_{sub}"
        stock_yaml = stock / bench.stock_yaml.format(sub=sub)
        spec = {"include": str(stock_yaml), "task": task, "tag": f"sftflow_{name}",
                "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                "num_fewshot": cfg.num_fewshot, **(bench.scoring or {}), **_generation(stock_yaml, name, cfg)}
        (out_dir / name / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        fingerprint = cache.key(stock_yaml, files, bench.scoring, cfg.num_fewshot, spec.get("generation_kwargs"))
        tasks.append(EvalTask(task, name, sub, stock_category(stock_yaml), fingerprint))
    return tasks


def stock_tasks(names: list[str], limit: int | None) -> list[EvalTask]:
    """Stock lm-eval tasks/groups by name; their data comes from the hub (online users)."""
    return [EvalTask(n, n, n, None, cache.key("stock", n, limit), stock=True) for n in names]


def sweep_tasks(cfg: EvalConfig, mirror: Path) -> list[EvalTask]:
    tasks = [t for name in BENCHMARKS if getattr(cfg, name).enabled
             for t in build_mirror(name, getattr(cfg, name), Path(cfg.benchmark_root), cfg.seed, mirror, cfg.alpha)]
    return tasks + stock_tasks(cfg.tasks, cfg.tasks_limit)
