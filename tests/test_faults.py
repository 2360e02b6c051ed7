"""Faults a run must survive: damaged cache entries, two writers of one entry, a full disk mid-checkpoint,
an unreachable MLflow server. Real stages, the tiny model, real processes; no mocks."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from safetensors.torch import load_file

from sftflow import cache
from sftflow.configs.schema import DataConfig
from sftflow.configs.training import TrainConfig
from sftflow.tasks.data.load import load
from sftflow.tasks.training.run import run_training, training_key
from sftflow.tracking import TrackingUnreachable, check_reachable

REPO = Path(__file__).resolve().parents[1]


def _truncate(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete", "drop the manifest's file list"])
def test_a_damaged_entry_is_discarded_and_counts_as_a_miss(damage):
    k = cache.key("unit-damage", damage)
    with cache.fill("unit", k) as d:
        (d / "sub").mkdir()
        (d / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    hit = cache.lookup("unit", k)
    assert hit is not None and cache.problem(hit) is None
    target = hit / "sub" / "weights.bin"
    if damage == "truncate":
        _truncate(target)
    elif damage == "flip a byte":
        data = bytearray(target.read_bytes())
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (hit / cache.MANIFEST).write_text("{}")
    assert cache.lookup("unit", k) is None
    assert not cache.entry("unit", k).exists()  # gone, so the stage recomputes and republishes


def test_the_data_stage_recomputes_a_truncated_entry(tmp_path, data_root):
    cfg = DataConfig(root=str(data_root), sources=[
        {"path": "natural-instructions/tasks/task363_sst2_polarity_classification.json", "max_records": 30}])
    first = load(cfg, out_dir=tmp_path / "a")
    second = load(cfg, out_dir=tmp_path / "b")
    assert second["metrics"]["load/cache_hit"] == 1
    _truncate(cache.entry("load", second["cache_key"]) / "records.jsonl")
    third = load(cfg, out_dir=tmp_path / "c")
    assert third["metrics"]["load/cache_hit"] == 0  # recomputed, not read half
    assert Path(third["records"]).read_text() == Path(first["records"]).read_text()
    assert load(cfg, out_dir=tmp_path / "d")["metrics"]["load/cache_hit"] == 1  # republished intact


def test_training_recomputes_a_cache_entry_with_a_truncated_weight_file(tmp_path, tokens, tiny_model):
    cfg = TrainConfig(method="lora", lora={"r": 4, "alpha": 8}, max_steps=4, batch_size=4, eval_steps=2,
                      logging_steps=2)
    first = run_training(tokens, tiny_model, cfg, out_dir=tmp_path / "a")
    published = load_file(Path(first["adapter_path"], "adapter_model.safetensors"))
    entry = cache.lookup("train", training_key(tokens, tiny_model, cfg))
    _truncate(entry / "adapter" / "adapter_model.safetensors")
    again = run_training(tokens, tiny_model, cfg, out_dir=tmp_path / "b")
    assert again["metrics"]["train/cache_hit"] == 0 and again["metrics"]["train/steps"] == 4
    reloaded = load_file(Path(again["adapter_path"], "adapter_model.safetensors"))  # whole again
    assert reloaded.keys() == published.keys()
    assert run_training(tokens, tiny_model, cfg, out_dir=tmp_path / "c")["metrics"]["train/cache_hit"] == 1


PUBLISH_JOB = """
import sys
from sftflow import cache
with cache.fill("race", sys.argv[1]) as d:
    for i in range(20):
        (d / f"part-{i}.bin").write_bytes(bytes([i]) * 100_000)
"""


def test_concurrent_writers_of_one_entry_leave_one_valid_entry():
    k = cache.key("race")
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISH_JOB, k], env=os.environ, stderr=subprocess.PIPE)
             for _ in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0], [p.stderr.read()[-2000:] for p in procs]
    hit = cache.lookup("race", k)
    assert hit is not None and len(list(hit.glob("part-*.bin"))) == 20
    assert [p.name for p in hit.parent.iterdir()] == [k]  # no temp or trash folder left behind


DISK_FULL_JOB = """
import json, sys
from sftflow import env
env.configure(offline=True)
from sftflow.tasks.training.checkpoints import DiskFull
from sftflow.configs.training import TrainConfig
from sftflow.tasks.training.run import run_training
tokens, model, cfg, out = json.loads(sys.argv[1])
try:
    run_training(tokens, model, TrainConfig(**cfg), out_dir=__import__("pathlib").Path(out))
except DiskFull as exc:
    print("ERROR:", exc, flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_and_a_rerun_resumes(tmp_path, tokens, tiny_model):
    cfg = dict(method="full", max_steps=40, batch_size=4, eval_steps=2, logging_steps=2, checkpoint={"keep": 2})
    work = cache.entry("train", training_key(tokens, tiny_model, TrainConfig(**cfg)))
    proc = subprocess.Popen([sys.executable, "-c", DISK_FULL_JOB, json.dumps([tokens, tiny_model, cfg,
                                                                              str(tmp_path / "full")])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)
    deadline = time.time() + 240
    while not list(work.glob("checkpoints/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    # The disk fills up: from now on no file of this process may grow past 4 KiB.
    psutil.Process(proc.pid).rlimit(psutil.RLIMIT_FSIZE, (4096, psutil.RLIM_INFINITY))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3, out[-3000:]
    error = out.split("ERROR: ", 1)[1]
    assert "disk full while writing checkpoint" in error and str(work / "checkpoints" / "checkpoint-") in error
    kept = sorted(work.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept and all((p / "trainer_state.json").exists() for p in kept)  # the half-written one is gone
    assert f"a rerun resumes from {kept[-1]}" in error
    step = int(kept[-1].name.split("-")[1])

    resumed = run_training(tokens, tiny_model, TrainConfig(**cfg), out_dir=tmp_path / "rerun")
    assert resumed["metrics"]["train/resumed_from_step"] == step < 40
    assert resumed["metrics"]["train/steps"] == 40


def test_an_unreachable_tracking_server_fails_at_once_naming_it():
    port = psutil.Process().pid % 1000 + 40000  # nothing listens there (checked below)
    uri = f"http://127.0.0.1:{port}"
    assert not any(c.laddr.port == port for c in psutil.net_connections("tcp") if c.status == "LISTEN")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        start = time.perf_counter()
        with pytest.raises(TrackingUnreachable, match=f"MLflow tracking server {uri} is unreachable"):
            check_reachable()
        assert time.perf_counter() - start < 6
    finally:
        mlflow.set_tracking_uri(previous)
