"""Validation, checkpoints, early stopping and resume for one Trainer run.

The Trainer saves `checkpoint-<step>/` folders (weights, optimizer, scheduler, RNG states, and
trainer_state.json last) into its output_dir. Run again on the same output_dir, a training resumes from
the last complete one: same step, optimizer moments, LR schedule, RNG and data order (the seedable
sampler replays the epoch's permutation and the Trainer skips the batches already seen), so a resumed
run ends where an uninterrupted one would.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from sftflow.configs.training import TrainConfig
from sftflow.errors import UserError

RUN_INFO = "run_info.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, over quota, over the file size limit


class DiskFull(UserError, OSError):
    """A checkpoint could not be written for lack of space; the previous complete checkpoint is kept."""


def schedule_args(cfg: TrainConfig, has_eval: bool) -> dict:
    """SFTConfig arguments: when to validate and checkpoint, how many to keep, which one is best."""
    every = cfg.checkpoint.every_steps or cfg.eval_steps
    args = {"save_strategy": "steps" if every else "epoch", "save_steps": every,
            "save_total_limit": cfg.checkpoint.keep, "eval_strategy": "no"}
    if has_eval:
        args.update(eval_strategy="steps" if cfg.eval_steps else "epoch", eval_steps=cfg.eval_steps,
                    load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return {k: v for k, v in args.items() if v is not None}


def step_of(checkpoint: Path) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1))


def is_complete(checkpoint: Path) -> bool:
    """trainer_state.json is written last: a checkpoint killed mid-save has none, or a truncated one."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a kill mid-save) are deleted so none is trusted."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)), key=step_of)
    for ckpt in reversed(found):
        if is_complete(ckpt):
            return ckpt
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def run_trainer(trainer, cfg: TrainConfig):
    """trainer.train(), resuming from the last complete checkpoint in its output_dir, with early stopping.

    Rank 0 writes run_info.json beside the output_dir (resume step, best checkpoint, early stop)."""
    from transformers import EarlyStoppingCallback

    if cfg.early_stopping.patience is not None:
        if trainer.eval_dataset is None:
            raise ValueError("train.early_stopping needs a validation split: set split.val_ratio > 0 "
                             "(or turn early stopping off with early_stopping.patience: null)")
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping.patience,
                                                   early_stopping_threshold=cfg.early_stopping.min_delta))
    output_dir = Path(trainer.args.output_dir)
    resume = last_checkpoint(output_dir)
    resumed_state = json.loads((resume / "trainer_state.json").read_text()) if resume else {}
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as exc:
        if _out_of_space(exc, output_dir):
            raise _disk_full(exc, output_dir) from exc
        raise

    state = trainer.state
    if trainer.is_world_process_zero():
        info = {
            "resumed_from_step": resumed_state.get("global_step", 0),
            "tokens_at_resume": resumed_state.get("num_input_tokens_seen", 0),
            "best_checkpoint": state.best_model_checkpoint,
            "best_step": step_of(Path(state.best_model_checkpoint)) if state.best_model_checkpoint else None,
            "best_val_loss": state.best_metric,
            "stopped_early": state.global_step < state.max_steps,
            "max_steps": state.max_steps,
            "world_size": trainer.args.world_size,
        }
        (output_dir.parent / RUN_INFO).write_text(json.dumps(info, indent=2))
    return result


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """The error, or a write attempted now, says the disk is full. torch's checkpoint writer reports a failed
    write as a bare RuntimeError ("unexpected pos ..."), so the errno alone cannot tell."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    probe = folder / ".space-probe"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
        return False
    except OSError as err:
        return err.errno in _FULL
    finally:
        probe.unlink(missing_ok=True)


def _disk_full(exc: BaseException, folder: Path) -> DiskFull:
    """Drop the half-written checkpoint (frees its space) and name what is kept to resume from."""
    partial = sorted((p for p in folder.glob("checkpoint-*") if not is_complete(p)), key=step_of)
    kept = last_checkpoint(folder)
    where = partial[-1] if partial else folder
    resume = f"a rerun resumes from {kept}" if kept else "no complete checkpoint yet: a rerun starts over"
    return DiskFull(errno.ENOSPC, f"disk full while writing checkpoint {where} ({type(exc).__name__}: {exc}); "
                                  f"free space there, then {resume}")
