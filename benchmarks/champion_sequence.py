"""A model name's life on the demo model: `python benchmarks/champion_sequence.py [--home DIR] [--json OUT]`.

  v1  the demo recipe (configs/demo.yaml), registered: the first version becomes champion if the gate passes
  v2  the same recipe with far fewer steps: it should beat the base and stay challenger, judged against v1
  v3  the recipe plus another review source (Rotten Tomatoes): judged on v1's frozen test items plus its new slice

Each is `sftflow run ... --register` in one fresh state dir (the base model converted once, as a user would);
the table gives each version's wall time, held-out label accuracy of base / champion / candidate, the gain over
the base and over the champion (95% paired-bootstrap CIs), the benchmark deltas against the champion, the data
seen before, what of the champion came from the cache, and the verdict. Figures: docs/CHAMPION.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFTFLOW = str(Path(sys.executable).with_name("sftflow"))
NAME = "demo"
EXTRA_SOURCE = ("{path: natural-instructions/tasks/task888_reviews_classification.json, name: rotten_tomatoes, "
                "max_records: 300}")
DEMO_SOURCES = [
    "{path: natural-instructions/tasks/task1312_amazonreview_polarity_classification.json, name: amazon, "
    "max_records: 450}",
    "{path: natural-instructions/tasks/task363_sst2_polarity_classification.json, name: sst2, max_records: 350}",
    "{path: natural-instructions/tasks/task761_app_review_classification.json, name: app_reviews, max_records: 297}"]
VERSIONS = {
    "v1": [],
    "v2": ["--set", "train.max_steps=8"],
    "v3": ["--set", "data.sources=[" + ", ".join([*DEMO_SOURCES, EXTRA_SOURCE]) + "]"],
}


def run(tag: str, extra: list[str], home: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    start = time.perf_counter()
    with (home / f"{tag}.log").open("w") as log:
        proc = subprocess.run([SFTFLOW, "run", "configs/demo.yaml", "--register", *extra], cwd=REPO,
                              env={**env, "SFTFLOW_HOME": str(home), "COLUMNS": "200"}, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{tag} exited {proc.returncode}: see {home / f'{tag}.log'}")
    return time.perf_counter() - start


def figures(home: Path, walls: dict[str, float]) -> list[dict]:
    os.environ["SFTFLOW_HOME"] = str(home)
    from mlflow.tracking import MlflowClient

    from sftflow import env
    from sftflow.release.lineage import versions

    env.configure(offline=True)
    client = MlflowClient()
    out = []
    for tag, row in zip(VERSIONS, versions(NAME)):
        m = client.get_run(row["run_id"]).data.metrics
        gate = json.loads(client.get_model_version(NAME, str(row["version"])).tags.get("gate.reasons", "[]"))
        pick = lambda prefix: {k.removeprefix(prefix): round(v, 4) for k, v in m.items()  # noqa: E731
                               if k.startswith(prefix)}
        out.append({"tag": tag, "version": row["version"], "role": row["role"], "wall_s": round(walls[tag]),
                    "judged_against": row["judged_against"], "passed": row["gate"], "reasons": gate,
                    "records": int(m["heldout/records"]), "splits": row["splits"], "data": row["data"],
                    "label_acc": {t: m.get(f"heldout/{t}/label_acc") for t in ("base", "champion", "ft")},
                    "gain": pick("heldout/delta/label_acc"), "vs_champion": pick("champion/delta/"),
                    "forgetting": {b: pick(f"forgetting/{b}/") for b in ("mmlu", "bbh")},
                    "champion_items": {k: m.get(f"heldout/champion/{k}") for k in ("cached_items", "evaluated_items")},
                    "champion_tasks": {k: m.get(f"eval/champion/{k}") for k in ("cached_tasks", "evaluated_tasks")},
                    "train_s": m.get("train/duration_s")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, help="state dir (default: a new temp folder)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="sftflow-champion-"))
    home.mkdir(parents=True, exist_ok=True)
    print(f"state dir {home}", flush=True)
    walls = {}
    for tag, extra in VERSIONS.items():
        walls[tag] = run(tag, extra, home)
        print(f"{tag}: {walls[tag]:.0f} s", flush=True)
    rows = figures(home, walls)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
