"""Stage 5, how it runs: a content-keyed work folder, so a killed training resumes when rerun or retried.

Each flow run gets a new run folder, so checkpoints cannot live there. They live in
`<state>/cache/train/<key>/checkpoints/`, where the key hashes what determines the trained model: the
tokenized train/val files, the base model, the train config (less what does not change the result)
and library versions. The next run of the same training - a Prefect retry or a rerun of the flow -
finds that folder and resumes from its last complete checkpoint. A finished training becomes a
complete cache entry (checkpoints dropped, the chosen model kept), so an identical rerun is a cache
hit (`train/cache_hit` = 1) and is copied into the run folder instead of trained again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path

from sftflow import cache, hooks, precision
from sftflow.cache import load_result, save_result
from sftflow.configs.training import TrainConfig
from sftflow.models import MANIFEST
from sftflow.results import Trained
from sftflow.tasks.training.checkpoints import RUN_INFO, last_checkpoint, step_of
from sftflow.tasks.training.launch import RESULT, SPEC, WorkerDied, launch
from sftflow.tracking import stage

STAGE = "train"
log = logging.getLogger("sftflow.train")


def training_key(token_paths: dict, model_path: str, cfg: TrainConfig) -> str:
    model = Path(model_path)
    if model.is_dir():  # a registry model's manifest holds the digest of all its files
        model_part = model / MANIFEST if (model / MANIFEST).exists() else model
    else:
        model_part = f"hub:{model_path}"
    # Knobs that change where/how often it runs but not what it learns stay out of the key.
    result_cfg = cfg.model_dump(mode="json", exclude={"checkpoint": {"keep"}, "launcher": {"kind", "config_file"},
                                                      "precision": True})
    libs = {lib: version(lib) for lib in ("torch", "transformers", "trl", "peft", "accelerate")}
    # `auto` resolves per machine (bf16 on some CPUs, fp32 on others): the precision that trains is what counts,
    # not the setting that chose it.
    resolved = {"precision": precision.training(cfg.precision)}
    return cache.key("train-v1", Path(token_paths["train"]), Path(token_paths["val"]), model_part, result_cfg,
                     resolved, libs)


@contextlib.contextmanager
def _exclusive(key: str):
    """One training per key at a time (two identical flows: the second waits, then hits the cache).
    An OS lock: released when its holder dies, so a killed run never blocks its own resume."""
    lock = cache.entry(STAGE, key).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        os.set_inheritable(fh.fileno(), True)  # launched workers hold it too (sftflow.tasks.training.launch)
        yield


def _run_metrics(info: dict) -> dict:
    """What this module adds: resume point, best checkpoint, early stop, processes."""
    out = {"train/resumed_from_step": info["resumed_from_step"],
           "train/stopped_early": float(info["stopped_early"]),
           "train/num_processes": info["world_size"]}
    if info["best_step"] is not None:
        out.update({"train/best_step": info["best_step"], "train/best_val_loss": info["best_val_loss"]})
    return out


def _train_and_publish(job: dict, cfg: TrainConfig, key: str) -> Path:
    work = cache.entry(STAGE, key)
    work.mkdir(parents=True, exist_ok=True)
    resume = last_checkpoint(work / "checkpoints")
    log.info("train: %s in %s", f"resuming from step {step_of(resume)}" if resume else "starting", work)
    try:
        result = launch({**job, "out_dir": str(work)}, cfg)
    except hooks.TrainingPruned as exc:
        pruned = exc
    else:
        pruned = None
    if pruned is not None:  # a partial training: nothing cached, no checkpoint to resume from
        shutil.rmtree(work, ignore_errors=True)
        # Without the traceback: its frames hold the trainer and model, which the next trial needs the memory of.
        raise pruned.with_traceback(None)
    result["metrics"].update(_run_metrics(json.loads((work / RUN_INFO).read_text())))
    with cache.fill(STAGE, key) as entry:
        for item in work.iterdir():
            if item.name not in ("checkpoints", SPEC, RESULT):
                os.replace(item, entry / item.name)
        save_result(entry, result, work)  # the entry's files, named relative to it
    return cache.entry(STAGE, key)


def _retry_if_worker_died(task, task_run, state) -> bool:
    """Retry a killed/crashed worker (it resumes); a deterministic error would only fail again."""
    return isinstance(state.result(raise_on_failure=False), WorkerDied)


@stage(STAGE, retries=2, retry_condition_fn=_retry_if_worker_died)
def run_training(token_paths: dict, model_path: str, cfg: TrainConfig, out_dir: Path,
                 trust_remote_code: bool = False) -> Trained:
    """Train (or resume, or reuse an identical finished training) and put its outputs in out_dir."""
    key = training_key(token_paths, model_path, cfg)
    entry, hit = cache.lookup(STAGE, key), True
    if entry is None:
        with _exclusive(key):
            entry = cache.lookup(STAGE, key)  # an identical run may have finished while we waited
            if entry is None:
                hit = False
                job = {"token_paths": token_paths, "model_path": model_path, "trust_remote_code": trust_remote_code}
                entry = _train_and_publish(job, cfg, key)
    # Hard links: a full model is not stored twice; files in both places are never modified.
    shutil.copytree(entry, out_dir, dirs_exist_ok=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(cache.MANIFEST))
    result = load_result(entry, out_dir)
    result["metrics"]["train/cache_hit"] = float(hit)
    result["params"] = {**result.get("params", {}), "train.cache_key": key}
    return result


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or dst exists
        shutil.copy2(src, dst)
