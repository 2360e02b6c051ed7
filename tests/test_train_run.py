"""How training runs: validation + early stopping, checkpoints, resume after SIGKILL, the training cache,
and `accelerate launch` with 2 CPU processes (DDP over gloo), all on the tiny model."""

import json
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from prefect.states import Failed
from safetensors.torch import load_file

from sftflow import cache
from sftflow.configs.loader import ConfigError, load_config
from sftflow.configs.training import TrainConfig
from sftflow.tasks.training.checkpoints import last_checkpoint
from sftflow.tasks.training.launch import RESULT, WorkerDied, accelerate_command
from sftflow.tasks.training.run import _retry_if_worker_died, run_training, training_key
from sftflow.tasks.training.train import train

REPO = Path(__file__).resolve().parents[1]


def history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "log_history.json").read_text())


def test_early_stopping_stops_on_val_loss_and_loads_the_best_checkpoint(tmp_path, tokens, tiny_model):
    # A learning rate this high diverges after the first steps: validation loss rises, so it must stop.
    cfg = TrainConfig(method="full", learning_rate=0.3, lr_scheduler="constant", warmup_ratio=0.0, max_steps=30,
                      batch_size=4, eval_steps=1, logging_steps=1, checkpoint={"keep": 1},
                      early_stopping={"patience": 2, "min_delta": 0.01})
    with mlflow.start_run(run_name="unit-early-stop"):
        out = train(tokens, tiny_model, cfg, out_dir=tmp_path)
    steps = out["metrics"]["train/steps"]
    evals = [(h["step"], h["eval_loss"]) for h in history(tmp_path) if "eval_loss" in h][:-1]  # last: final evaluate
    # Replay the rule: a loss counts as better only when it beats the best by more than min_delta.
    best, bad, expected_stop = None, 0, None
    for step, loss in evals:
        bad = 0 if best is None or best - loss > 0.01 else bad + 1
        best = loss if best is None else min(best, loss)
        if bad == 2:
            expected_stop = step
            break
    assert expected_stop == steps < 30 and evals[-1][0] == steps
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_loss < evals[-1][1]  # the last model is worse: loading the best one matters
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["stopped_early"] and info["best_step"] == best_step
    assert out["metrics"]["train/val_loss"] == pytest.approx(best_loss, rel=1e-5)
    saved = load_file(tmp_path / "model" / "model.safetensors")
    kept = load_file(tmp_path / "checkpoints" / f"checkpoint-{best_step}" / "model.safetensors")
    assert all((saved[k] == kept[k]).all() for k in kept)
    # keep=1: the rotation keeps only the best checkpoint once training ends.
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{best_step}"]


def test_early_stopping_without_a_validation_split_is_refused(tmp_path, tokens, tiny_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="needs a validation split"):
        train({"train": tokens["train"], "val": str(empty)}, tiny_model,
              TrainConfig(max_steps=2, early_stopping={"patience": 1}), out_dir=tmp_path)


def test_checkpoint_interval_must_fall_on_validation_steps(tmp_path):
    with pytest.raises(ConfigError, match="must be a multiple of eval_steps"):
        load_config(None, ["train.eval_steps=4", "train.checkpoint.every_steps=6"], base={"data": {"sources": [
            {"path": "x.jsonl"}]}})
    with pytest.raises(ConfigError, match="need kind: accelerate"):
        load_config(None, ["train.launcher.num_processes=2"], base={"data": {"sources": [{"path": "x.jsonl"}]}})


def test_a_checkpoint_killed_mid_save_is_never_resumed_from(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # killed before its trainer state was written
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert last_checkpoint(tmp_path / "absent") is None


RESUME_CFG = dict(method="lora", lora={"r": 4, "alpha": 8}, learning_rate=5e-3, max_steps=40, batch_size=4,
                  eval_steps=5, logging_steps=5, warmup_ratio=0.1)


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_when_retried_or_rerun(tmp_path, tokens, tiny_model):
    launched = TrainConfig(**RESUME_CFG, launcher={"kind": "accelerate"})
    key = training_key(tokens, tiny_model, launched)
    work = cache.entry("train", key)
    failed = {}

    def first_attempt():
        with mlflow.start_run(run_name="unit-killed"):
            try:
                run_training(tokens, tiny_model, launched, out_dir=tmp_path / "killed")
            except WorkerDied as exc:
                failed["exc"] = exc

    # The stage launches its training worker; SIGKILL it once its first checkpoint is on disk.
    attempt = threading.Thread(target=first_attempt)
    attempt.start()
    deadline = time.time() + 300
    while not list(work.glob("checkpoints/checkpoint-*/trainer_state.json")):
        assert attempt.is_alive() and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = [p for p in psutil.Process().children(recursive=True)
               if "sftflow.tasks.training.launch" in p.cmdline() and "accelerate.commands.launch" not in p.cmdline()]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    attempt.join()
    assert isinstance(failed.get("exc"), WorkerDied) and not (work / RESULT).exists()
    assert _retry_if_worker_died(None, None, Failed(data=failed["exc"]))  # so Prefect retries the task
    done = max(int(p.name.split("-")[1]) for p in work.glob("checkpoints/checkpoint-*"))
    assert done < 40

    # The retry (here in-process: the launcher is not part of the key, so it finds the same folder).
    cfg = TrainConfig(**RESUME_CFG)
    assert training_key(tokens, tiny_model, cfg) == key
    with mlflow.start_run(run_name="unit-retry"):
        resumed = run_training(tokens, tiny_model, cfg, out_dir=tmp_path / "retry")
    with mlflow.start_run(run_name="unit-uninterrupted"):
        straight = train(tokens, tiny_model, cfg, out_dir=tmp_path / "straight")
    m, ref = resumed["metrics"], straight["metrics"]
    assert 0 < m["train/resumed_from_step"] == done and m["train/cache_hit"] == 0
    assert m["train/steps"] == ref["train/steps"] == 40
    assert m["train/final_loss"] == pytest.approx(ref["train/final_loss"], rel=0.01)
    assert m["train/val_loss"] == pytest.approx(ref["train/val_loss"], rel=0.01)
    # Same logged losses before and after the kill: same data order, optimizer and RNG after resuming.
    logged = {run: {h["step"]: h["loss"] for h in history(tmp_path / run) if "loss" in h}
              for run in ("retry", "straight")}
    assert logged["retry"] == pytest.approx(logged["straight"], rel=0.01)
    assert Path(resumed["adapter_path"], "adapter_model.safetensors").exists()
    assert not (cache.lookup("train", key) / "checkpoints").exists()  # published without its checkpoints

    # The same training in a later flow run: a cache hit, nothing trained, outputs in its own folder.
    with mlflow.start_run(run_name="unit-hit"):
        hit = run_training(tokens, tiny_model, cfg, out_dir=tmp_path / "hit")
    assert hit["metrics"]["train/cache_hit"] == 1
    assert hit["metrics"]["train/final_loss"] == m["train/final_loss"]
    assert hit["adapter_path"] == str(tmp_path / "hit" / "adapter")
    assert load_file(Path(hit["adapter_path"], "adapter_model.safetensors")).keys() == \
        load_file(Path(resumed["adapter_path"], "adapter_model.safetensors")).keys()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="on a CUDA machine DDP runs one process per GPU: needs 2 GPUs")
def test_accelerate_launch_with_two_cpu_processes_trains_like_one(tmp_path, tokens, tiny_model):
    # DDP: 2 processes x 2 rows = the same global batch of 4 as one process (dropout off: no per-rank RNG;
    # fp32 so that the comparison is exact enough on GPUs too).
    common = dict(method="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}, learning_rate=5e-3, max_steps=8,
                  eval_steps=4, logging_steps=2, warmup_ratio=0.0, precision="fp32")
    ddp = TrainConfig(**common, batch_size=2, launcher={"kind": "accelerate", "num_processes": 2})
    with mlflow.start_run(run_name="unit-ddp") as run:
        out = run_training(tokens, tiny_model, ddp, out_dir=tmp_path / "ddp")
    with mlflow.start_run(run_name="unit-single"):
        single = train(tokens, tiny_model, TrainConfig(**common, batch_size=4), out_dir=tmp_path / "single")
    m = out["metrics"]
    assert m["train/num_processes"] == 2 and m["train/steps"] == 8
    assert m["train/tokens_seen"] == single["metrics"]["train/tokens_seen"]  # both ranks' tokens are counted
    # Gradients averaged over ranks (and tokens counted across them) = the single-process step.
    assert m["train/final_loss"] == pytest.approx(single["metrics"]["train/final_loss"], rel=1e-3)
    assert m["train/val_loss"] == pytest.approx(single["metrics"]["train/val_loss"], rel=1e-3)
    assert Path(out["adapter_path"], "adapter_model.safetensors").exists()
    # Step metrics came back from the workers (rank 0 only: once per step).
    steps = [x.step for x in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [2, 4, 6, 8]


def test_shipped_accelerate_configs_load_and_reach_the_launch_command(tmp_path):
    """GPU-cluster examples: accelerate accepts them; only DDP on CPU (above, no file) runs here."""
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: load_config_from_file(str(p)) for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert {k: v.distributed_type.value for k, v in kinds.items()} == \
        {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}
    for name in kinds:
        cfg = TrainConfig(launcher={"kind": "accelerate", "num_processes": 8,
                                    "config_file": f"{REPO}/configs/accelerate/{name}.yaml"})
        cmd = accelerate_command(tmp_path / "spec.json", cfg)
        assert cmd[cmd.index("--config_file") + 1].endswith(f"{name}.yaml") and "8" in cmd
