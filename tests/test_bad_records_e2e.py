"""A user's own chat-format JSONL with some broken lines, through `sftflow curate` (the real flow) to the end.

400 lines in a folder of their own: 4 lines of malformed JSON (1%), 1 line that is not UTF-8, and
records without a `label` field checked by `curate.allowed_labels` against their final assistant turn.
"""

import json
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sftflow.cli.app import app
from sftflow.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"{a}{b}" for a in ("film", "plot", "cast", "score", "scene", "actor", "story", "set") for b in
         ("ly", "er", "ish", "ness", "ful", "ward", "less", "ing", "ed", "ist", "ous", "ive")]


def user_chat_file(folder: Path) -> tuple[Path, dict[int, str]]:
    """-> the file and {line: expected reject kind}."""
    rng = random.Random(7)
    lines, bad = [], {}
    for n in range(1, 401):
        review = " ".join(rng.choice(WORDS) for _ in range(24))
        answer = "maybe" if n % 80 == 0 else rng.choice(["positive", "negative"])
        line = json.dumps({"messages": [{"role": "system", "content": "Label the review."},
                                        {"role": "user", "content": f"Review {n}: {review}"},
                                        {"role": "assistant", "content": f" {answer}\n"}]}).encode()
        if n in (57, 131, 222, 390):
            line, bad[n] = line[: len(line) // 2], "invalid JSON"  # a truncated write
        elif n == 300:
            line, bad[n] = line.replace(b"Review", b"R\xe9view"), "not UTF-8"  # a Latin-1 byte
        lines.append(line)
    path = folder / "my_chats.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, bad


@pytest.mark.e2e
def test_user_chat_file_with_broken_lines_runs_through_the_data_stage(tmp_path, data_root, prefect_server):
    data_file, bad = user_chat_file(tmp_path)
    assert data_root not in data_file.parents
    cfg = yaml.safe_load((REPO / "configs/smoke.yaml").read_text())
    cfg["data"] = {"root": str(data_root), "sources": [{"path": str(data_file), "name": "mine"}]}
    cfg["curate"] = {"allowed_labels": ["positive", "negative"]}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(cfg))

    result = CliRunner().invoke(app, ["curate", str(tmp_path / "mine.yaml")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "400 records in" in text and "invalid JSON" in text

    train = next(p.rstrip(",") for p in result.output.split() if p.rstrip(",").endswith("/split/train.jsonl"))
    run_dir = Path(train).parents[1]
    rejects = list(read_jsonl(run_dir / "load" / "load_rejects.jsonl"))
    assert {r["index"]: r["reason"].split(":")[0] for r in rejects} == bad
    assert all(r["file"] == str(data_file) for r in rejects)
    labels = [r for r in read_jsonl(run_dir / "curate" / "curate_rejects.jsonl") if r["reason"] == "label_not_allowed"]
    assert sorted(r["index"] for r in labels) == [80, 160, 240, 320, 400]

    report = json.loads((run_dir / "split" / "curation_report.json").read_text())
    a = report["accounting"]
    assert a["records_in"] == 400 == a["kept"] + a["rejected"] + a["exact_dup"] + a["near_dup"] + a["contaminated"]
    assert a["rejected"] == len(bad) + len(labels) and a["kept"] >= 380 and not report["dominant"]
    kept_ids = {r["id"] for s in ("train", "val", "test") for r in read_jsonl(run_dir / "split" / f"{s}.jsonl")}
    assert len(kept_ids) == a["kept"]
