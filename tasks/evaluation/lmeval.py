"""Running lm-eval for one model, with a per-model, per-task result cache.

Results are cached per (model digest, task fingerprint, eval settings, lm-eval version), so the base
model is evaluated once across runs; only models that carry a `digest` are cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from sftflow import cache, precision
from sftflow.configs.schema import EvalConfig
from sftflow.models import load_causal_lm, tokenizer_digest
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.evaluation.mirror import EvalTask


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


class _LoadedModelNotice(logging.Filter):
    """lm-eval warns twice that `pretrained` is a loaded model: handing it one is the point, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "`pretrained` model kwarg is not of type `str`" not in msg and "already-initialized model" not in msg


def lm_eval_model(model: dict, cfg: EvalConfig, trust_remote_code: bool):
    """lm-eval's HF model around our own loaded model: a LoRA adapter merged into its base in memory (the
    same scores as lm-eval's `peft=` route, without the adapter's extra matmuls in every forward pass), with
    few-shot prompts' shared examples computed once per subtask (hflm.py)."""
    from sftflow.tasks.evaluation.hflm import SharedPrefixHFLM

    loaded = load_causal_lm(model["path"], trust_remote_code, adapter=model.get("adapter"), merge=True).eval()
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _LoadedModelNotice) for f in hf_logger.filters):
        hf_logger.addFilter(_LoadedModelNotice())
    return SharedPrefixHFLM(pretrained=loaded, tokenizer=model.get("tokenizer") or model["path"],
                            batch_size=cfg.batch_size, trust_remote_code=trust_remote_code)


def run_lm_eval(model: dict, tasks: list[EvalTask], include: Path, cfg: EvalConfig, trust_remote_code: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    stock = any(t.stock for t in tasks)  # indexing lm-eval's own tasks costs seconds
    return simple_evaluate(
        model=lm_eval_model(model, cfg, trust_remote_code), tasks=[t.name for t in tasks],
        log_samples=True, bootstrap_iters=0,
        limit=cfg.tasks_limit if stock else None, apply_chat_template=cfg.apply_chat_template,
        task_manager=TaskManager(include_path=str(include), include_defaults=stock),
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed)


ITEMS_FORMAT = 2  # bump when the per-item rows change shape, so older cache entries are not read


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def result_key(model: dict, task: EvalTask, cfg: EvalConfig) -> str | None:
    """Cache key of one model's items on one task, or None when the model has no content digest (a hub id
    names a model whose files can change under it, so it is never cached)."""
    if not model.get("digest") or model["digest"].startswith("hub:"):
        return None
    return cache.key("lm-eval", ITEMS_FORMAT, lm_eval_version(), model["digest"],
                     tokenizer_digest(model.get("tokenizer") or model["path"]), task.fingerprint,
                     {"chat": cfg.apply_chat_template, "seed": cfg.seed, "tasks_limit": cfg.tasks_limit,
                      "dtype": precision.inference()})


def model_items(model: dict, tasks: list[EvalTask], include: Path, cfg: EvalConfig,
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
