"""Every performance benchmark in one run: `python -m benchmarks [--quick] [--json out.json] [--repeats N]`.

  P1  orchestration overhead: the pipeline through Prefect + MLflow / the same stage functions called directly
      (benchmarks/pipeline_arms.py; each arm a fresh state dir sharing the built models; process wall time)
  P2  unchanged rerun: a second flow run on the first one's state dir / the first
  P3  packing: benchmarks/packing_speed.py (median step tokens/s of padding-free and packed rows vs stock TRL)
  P4  near dedup: benchmarks/near_dedup.py (speed-up over datasketch, at its recall)
  P5  trainer vs bare PyTorch loop: benchmarks/trainer_overhead.py
  P6  peak RSS of the first flow run's process tree (the ephemeral Prefect server included)
  P7  CPU precision: bf16 / fp32 training tokens/s and lm-eval speed on this CPU (benchmarks/cpu_precision.py;
      `auto` takes bf16 on CPUs with AMX-BF16/AVX512-BF16)
  E1  evaluation: lm-eval wall time of the fine-tuned model / the base's, in the first flow run

Full mode runs configs/demo.yaml and the scripts on the demo model; `--quick` runs configs/smoke.yaml and the
scripts on the tiny random model with few steps (a few minutes: keeps the scripts working, its figures mean
little). Ratios come from arms measured in the same run; with --repeats N the medians over N repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GIB = 1024 ** 3
# Variables of the caller's Prefect/MLflow set-up: each arm gets its own state dir and ephemeral servers.
FOREIGN_ENV = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SFTFLOW_DEBUG")
MODES = {
    # Full mode skips the packing loss curves (a whole epoch of the demo model); quick mode trains them, since the
    # tiny model's epoch is short and the benchmark's tests check the curves.
    "full": {"config": "configs/demo.yaml", "packing": ["--no-curves"], "trainer": [], "dedup": [], "precision": []},
    "quick": {"config": "configs/smoke.yaml", "packing": ["--steps", "2", "--repeats", "1", "--pack-length", "512"],
              "trainer": ["--steps", "2", "--repeats", "1"], "dedup": ["--repeats", "1", "--max-records", "1000"],
              "precision": ["--steps", "3", "--repeats", "1", "--mmlu", "1", "--bbh", "1"]},
}


class Failed(Exception):
    pass


def tree_rss(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def timed(cmd: list[str], env: dict, log: Path, cwd: Path = REPO) -> tuple[float, int]:
    """Run cmd (output to log) -> (wall seconds, peak RSS of its process tree, sampled every 0.2 s)."""
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)
        wall = time.perf_counter() - start
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise Failed(f"{' '.join(cmd[1:3])} exited {proc.returncode} (log {log}):\n{tail}")
    return wall, peak


def arm_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    return {**env, "SFTFLOW_HOME": str(home), **extra}


def fresh_home(work: Path, name: str, models: Path) -> Path:
    """A new state dir whose built models are the shared ones (converting a model is not what is measured)."""
    home = work / name
    home.mkdir(parents=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    return home


def pipeline_arm(arm: str, target: str, home: Path, name: str, logs: Path) -> tuple[float, int, dict]:
    out = logs / f"{name}.json"
    wall, peak = timed([sys.executable, str(BENCH / "pipeline_arms.py"), arm, target, "--out", str(out),
                        "--work", str(home / "direct")], arm_env(home), logs / f"{name}.log")
    return wall, peak, json.loads(out.read_text())


def orchestration(config: str, work: Path, models: Path, repeats: int) -> list[dict]:
    """P1, P2, P6 and E1 from flow and direct arms, alternating per repeat."""
    p1, p2, p6, e1, walls = [], [], [], [], {"flow": [], "rerun": [], "direct": []}
    for r in range(repeats):
        flow_home = fresh_home(work, f"flow{r}", models)
        first, peak, result = pipeline_arm("flow", config, flow_home, f"flow{r}", work)
        rerun, _, _ = pipeline_arm("flow", config, flow_home, f"rerun{r}", work)
        direct, _, _ = pipeline_arm("direct", config, fresh_home(work, f"direct{r}", models), f"direct{r}", work)
        m = result["metrics"]
        p1.append(first / direct)
        p2.append(rerun / first)
        p6.append(peak / GIB)
        e1.append(m["eval/ft/wall_s"] / m["eval/base/wall_s"])
        for name, value in (("flow", first), ("rerun", rerun), ("direct", direct)):
            walls[name].append(value)
        print(f"repeat {r}: flow {first:.1f} s, rerun {rerun:.1f} s, direct {direct:.1f} s, peak RSS "
              f"{peak / GIB:.2f} GiB, lm-eval ft {m['eval/ft/wall_s']:.1f} s / base {m['eval/base/wall_s']:.1f} s",
              flush=True)
    med = statistics.median
    flow, rerun, direct = (med(walls[k]) for k in ("flow", "rerun", "direct"))
    return [
        row("P1", "orchestration overhead: flow (Prefect + MLflow) / direct stage calls", med(p1), "x", 1.10,
            f"flow {flow:.1f} s, direct {direct:.1f} s"),
        row("P2", "unchanged rerun: second flow run / first", med(p2), "x", 0.05,
            f"rerun {rerun:.1f} s, first {flow:.1f} s"),
        row("P6", "peak RSS of the flow's process tree", med(p6), "GiB", 8.0, "first run, sampled every 0.2 s"),
        row("E1", "lm-eval wall time: fine-tuned / base", med(e1), "x", 1.3, "first flow run (base not cached)"),
    ]


def script(name: str, args: list[str], env: dict, work: Path) -> str:
    log = work / f"{name}.log"
    timed([sys.executable, str(BENCH / f"{name}.py"), *args], env, log, cwd=BENCH)
    return log.read_text()


def find(pattern: str, text: str, what: str) -> re.Match:
    if (m := re.search(pattern, text, re.M)) is None:
        raise Failed(f"{what}: no line matching {pattern!r} in its output")
    return m


def scripts(mode: dict, env: dict, work: Path) -> list[dict]:
    out = script("packing_speed", mode["packing"], env, work)
    rates = {arm: float(find(rf"^{arm}\s+([\d.]+)\s", out, "packing_speed").group(1))
             for arm in ("trl_default", "padding_free", "packed")}
    rows = [row("P3", "packing: packed tok/s / stock TRL padded", rates["packed"] / rates["trl_default"], "x", None,
                f"padding_free {rates['padding_free'] / rates['trl_default']:.2f}x; trl_default "
                f"{rates['trl_default']:.0f} tok/s")]
    out = script("near_dedup", mode["dedup"], env, work)
    m = find(r"^speed-up ([\d.]+)x at recall ([\d.]+) vs ([\d.]+)", out, "near_dedup")
    records = find(r"^(\d+) records", out, "near_dedup").group(1)
    rows.append(row("P4", "near dedup: speed-up over datasketch", float(m.group(1)), "x", None,
                    f"{records} records; recall {m.group(2)} vs {m.group(3)}"))
    out = script("trainer_overhead", mode["trainer"], env, work)
    m = find(r"trainer ([\d.]+) s, bare loop ([\d.]+) s, ratio ([\d.]+)x", out, "trainer_overhead")
    rows.append(row("P5", "trainer step / bare PyTorch step", float(m.group(3)), "x", 1.15,
                    f"trainer {m.group(1)} s, bare {m.group(2)} s per step"))
    out = script("cpu_precision", mode["precision"], env, work)
    m = find(r"^bf16/fp32 speed: training ([\d.]+)x, lm-eval ([\d.]+)x \(auto picks (\w+) here\)", out,
             "cpu_precision")
    cpu = find(r"^CPU: (.*)$", out, "cpu_precision").group(1)
    rows.append(row("P7", "CPU bf16 / fp32 training speed", float(m.group(1)), "x", None,
                    f"lm-eval {m.group(2)}x; auto picks {m.group(3)}; {cpu}"))
    return rows


def row(key: str, name: str, value: float, unit: str, target: float | None, detail: str) -> dict:
    return {"id": key, "name": name, "value": round(value, 4), "unit": unit, "target": target,
            "ok": None if target is None else value <= target, "detail": detail}


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "torch not installed"
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, {gpu}"


def table(rows: list[dict]) -> str:
    lines = ["| id | measure | value | target | ok | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.3g} {r['unit']}" if r["value"] is not None else "failed"
        target = "" if r["target"] is None else f"<= {r['target']:g} {r['unit']}"
        ok = "" if r["ok"] is None else "yes" if r["ok"] else "no"
        lines.append(f"| {r['id']} | {r['name']} | {value} | {target} | {ok} | {r['detail']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke config and tiny model: minutes, for CI")
    ap.add_argument("--json", type=Path, help="write the results here (default: <state dir>/benchmarks/<time>.json)")
    ap.add_argument("--repeats", type=int, default=1, help="flow/direct repeats (medians); default 1")
    ap.add_argument("--only", choices=("pipeline", "scripts"), help="run one group")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sftflow.env import state_dir

    mode = MODES["quick" if args.quick else "full"]
    if args.quick:  # spinning OpenMP threads swing tiny-model timings by 10x under other load (benchmarks/common.py)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    shared = state_dir()  # built models are reused from (and kept in) the usual state dir
    work = Path(tempfile.mkdtemp(prefix="sftflow-bench-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{'quick' if args.quick else 'full'} mode, {mode['config']}; work dir {work}", flush=True)
    rows: list[dict] = []
    errors: list[str] = []
    try:
        import yaml

        shared.mkdir(parents=True, exist_ok=True)
        alias = yaml.safe_load((REPO / mode["config"]).read_text())["model"]["base"]
        _, _, pulled = pipeline_arm("pull", alias, shared, "pull", work)
        if args.only != "scripts":
            rows += orchestration(mode["config"], work, shared / "models", args.repeats)
        if args.only != "pipeline":
            env = arm_env(fresh_home(work, "scripts", shared / "models"), TMPDIR=str(work),
                          **({"SFTFLOW_BENCH_MODEL": pulled["path"]} if args.quick else {}))
            rows += scripts(mode, env, work)
    except Failed as exc:
        errors.append(str(exc))
    print(table(rows))
    result = {"date": started, "machine": machine(), "mode": "quick" if args.quick else "full",
              "config": mode["config"], "results": rows, "errors": errors}
    path = args.json or shared / "benchmarks" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{started}, {result['machine']}; results {path}")
    for e in errors:
        print(f"FAILED: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
