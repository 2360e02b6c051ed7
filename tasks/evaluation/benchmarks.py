"""Stage 6b: lm-eval sweeps on MMLU and BBH (and any stock lm-eval task), every model vs the base.

Offline mirrors: each task YAML `include`s lm-eval's own stock YAML (mmlu/default, bbh/fewshot) and
overrides only where the rows come from, so prompts, choices, few-shot examples and metrics are
lm-eval's. One scoring change, for BBH: the generation is whitespace-stripped before exact match.
Rows are converted from the original files with a seeded per-subtask sample.

Results are cached per (model digest, task fingerprint, eval settings, lm-eval version), so the base
model is evaluated once across runs; only models that carry a `digest` are cached.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftflow import cache
from sftflow.charts import plot_deltas
from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.evaluation.forgetting import forgetting_metrics, forgetting_rows, to_markdown
from sftflow.tasks.evaluation.mirrors import BENCHMARKS, check, stock_tasks_dir, unknown_subtasks
from sftflow.tracking import stage_task


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


def per_item(result: dict, task: EvalTask) -> Iterator[dict]:
    """lm-eval's logged samples -> one row per item: benchmark, subtask, doc_id, score (first filter) and
    the exact prompt the model was sent. A stock name (task, group or tag) runs alone, so every leaf
    task in its result belongs to it."""
    leaves = [task.name] if task.name in result["samples"] else sorted(result["samples"])
    for leaf in leaves:
        metric = result["configs"][leaf]["metric_list"][0]["metric"]
        samples = result["samples"][leaf]
        first_filter = samples[0]["filter"] if samples else None
        for s in samples:
            if s["filter"] == first_filter:
                yield {"benchmark": task.benchmark, "task": task.subtask if leaf == task.name else leaf,
                       "category": task.category, "doc_id": s["doc_id"], "metric": metric,
                       "score": float(s[metric]), "prompt": s["arguments"][0][0]}


def precision() -> str:
    """As training and held-out generation: bf16 where a GPU supports it, float32 otherwise."""
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def run_lm_eval(model: dict, tasks: list[EvalTask], include: Path, cfg: EvalConfig, trust_remote_code: bool) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": model["path"], "dtype": precision(), "trust_remote_code": trust_remote_code}
    if model.get("adapter"):
        model_args["peft"] = model["adapter"]
    if model.get("tokenizer"):
        model_args["tokenizer"] = model["tokenizer"]
    stock = any(t.stock for t in tasks)  # indexing lm-eval's own tasks costs seconds
    return simple_evaluate(
        model="hf", model_args=model_args, tasks=[t.name for t in tasks], batch_size=cfg.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu", log_samples=True, bootstrap_iters=0,
        limit=cfg.tasks_limit if stock else None, apply_chat_template=cfg.apply_chat_template,
        task_manager=TaskManager(include_path=str(include), include_defaults=stock),
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed)


def _tokenizer_digest(path: str) -> str:
    """Tokenizer files only (the chat template lives there); a hub id stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and
                   (p.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges"))))
    return cache.key(files)


ITEMS_FORMAT = 1  # bump when the per-item rows change shape, so older cache entries are not read


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def result_key(model: dict, task: EvalTask, cfg: EvalConfig) -> str | None:
    """Cache key of one model's items on one task, or None when the model has no content digest (a hub id
    names a model whose files can change under it, so it is never cached)."""
    if not model.get("digest") or model["digest"].startswith("hub:"):
        return None
    return cache.key("lm-eval", ITEMS_FORMAT, lm_eval_version(), model["digest"],
                     _tokenizer_digest(model.get("tokenizer") or model["path"]), task.fingerprint,
                     {"chat": cfg.apply_chat_template, "seed": cfg.seed, "tasks_limit": cfg.tasks_limit,
                      "dtype": precision()})


def evaluate_model(model: dict, tasks: list[EvalTask], include: Path, cfg: EvalConfig,
                   trust_remote_code: bool) -> tuple[list[dict], dict]:
    """Items of one model on every task: cached tasks are read back, the rest run in one lm-eval call."""
    keys = {t.name: result_key(model, t, cfg) for t in tasks}
    hits = {name: cache.lookup("benchmarks", k) for name, k in keys.items() if k}
    todo = [t for t in tasks if hits.get(t.name) is None]
    items: dict[str, list[dict]] = {name: list(read_jsonl(path / "items.jsonl"))
                                    for name, path in hits.items() if path is not None}
    info = {"cached_tasks": len(tasks) - len(todo), "evaluated_tasks": len(todo), "wall_s": 0.0}
    # Mirrors run together; each stock name alone, so its leaf tasks can be told apart from the others'.
    mirrors = [t for t in todo if not t.stock]
    batches = ([mirrors] if mirrors else []) + [[t] for t in todo if t.stock]
    start = time.perf_counter()
    for batch in batches:
        result = run_lm_eval(model, batch, include, cfg, trust_remote_code)
        for task in batch:
            items[task.name] = list(per_item(result, task))
            if keys[task.name]:
                with cache.fill("benchmarks", keys[task.name]) as entry:
                    write_jsonl(entry / "items.jsonl", items[task.name])
    info["wall_s"] = time.perf_counter() - start if batches else 0.0
    return [it for t in tasks for it in items[t.name]], info


def aggregate(items: list[dict], tag: str) -> dict[str, float]:
    """Micro-averages (as lm-eval's weight_by_size groups) per benchmark, per category and per subtask."""
    groups: dict[str, list[float]] = {}
    for it in items:
        metric = it["metric"]
        groups.setdefault(f"{it['benchmark']}/{metric}", []).append(it["score"])
        groups.setdefault(f"{it['benchmark']}/{it['task']}/{metric}", []).append(it["score"])
        if it.get("category"):
            groups.setdefault(f"{it['category']}/{metric}", []).append(it["score"])
    metrics = {f"eval/{tag}/{k}": sum(v) / len(v) for k, v in groups.items()}
    for bench in {it["benchmark"] for it in items}:
        metrics[f"eval/{tag}/{bench}/n"] = sum(it["benchmark"] == bench for it in items)
    return metrics


def sweep_tasks(cfg: EvalConfig, mirror: Path) -> list[EvalTask]:
    tasks = [t for name in BENCHMARKS if getattr(cfg, name).enabled
             for t in build_mirror(name, getattr(cfg, name), Path(cfg.benchmark_root), cfg.seed, mirror)]
    return tasks + stock_tasks(cfg.tasks, cfg.tasks_limit)


def sweep_models(model: str, base: str, offline: bool, baseline: bool) -> dict[str, dict]:
    """`sftflow eval`'s models: the one asked for as "model" (a LoRA adapter folder sits on `base`),
    plus the base itself when comparing; compared models share the base's tokenizer and chat template."""
    from sftflow.models import resolve

    adapter = Path(model).expanduser()
    if (adapter / "adapter_config.json").is_file():
        on = resolve(base, offline)
        spec = {"path": on.path, "adapter": str(adapter.resolve()), "tokenizer": on.path}
    else:
        found = resolve(model, offline)
        spec = {"path": found.path, "digest": found.digest, "tokenizer": found.path}
    if not baseline:
        return {"model": spec}
    ref = resolve(base, offline)
    return {"base": {"path": ref.path, "digest": ref.digest, "tokenizer": ref.path},
            "model": {**spec, "tokenizer": ref.path}}


def benchmarks(models: dict[str, dict], cfg: EvalConfig, out_dir: Path, trust_remote_code: bool = False) -> dict:
    """models: {"base": {"path", "digest"?}, "ft": {"path", "adapter"?}, ...}: any number, any names.

    Each model is swept over the same items; every model other than "base" is compared with "base"
    (forgetting rows with paired-bootstrap CIs and McNemar tests, a chart, markdown and JSON).
    """
    mirror = out_dir / "tasks"
    tasks = sweep_tasks(cfg, mirror)
    if not tasks:
        return {"metrics": {}}
    metrics: dict[str, float] = {}
    items: dict[str, list[dict]] = {}
    for tag, spec in models.items():
        items[tag], info = evaluate_model(spec, tasks, mirror, cfg, trust_remote_code)
        metrics.update({f"eval/{tag}/{k}": v for k, v in info.items()})
        write_jsonl(out_dir / f"items_{tag}.jsonl", items[tag])
        metrics.update(aggregate(items[tag], tag))
    artifacts = [mirror, *(out_dir / f"items_{t}.jsonl" for t in items)]
    rows = {}
    if "base" in items:
        for tag in (t for t in items if t != "base"):
            rows[tag] = forgetting_rows(items["base"], items[tag], cfg.bootstrap_iters, cfg.alpha, cfg.seed)
            metrics.update(forgetting_metrics(rows[tag], tag))
            (out_dir / f"forgetting_{tag}.md").write_text(to_markdown(rows[tag], tag, cfg.alpha) + "\n")
            plot_deltas(rows[tag], out_dir / f"forgetting_{tag}.png", f"{tag} minus base (95% CI)")
            artifacts += [out_dir / f"forgetting_{tag}.md", out_dir / f"forgetting_{tag}.png"]
        (out_dir / "forgetting.json").write_text(json.dumps(rows, indent=2))
        artifacts.append(out_dir / "forgetting.json")
    (out_dir / "benchmarks.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics, "forgetting": rows, "artifacts": [out_dir / "benchmarks.json", *artifacts],
            "params": {"eval.benchmarks": ",".join(sorted({t.benchmark for t in tasks})),
                       "eval.lm_eval_version": lm_eval_version()}}


benchmarks_task = stage_task(benchmarks, "benchmarks")
