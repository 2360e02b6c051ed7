import json

from sftflow.tasks.report import report


def test_report_rows_carry_base_ft_and_delta_per_measure(tmp_path):
    held = {"heldout/records": 40, "heldout/base/exact_match": 0.25, "heldout/ft/exact_match": 0.9,
            "heldout/delta/exact_match": 0.65, "heldout/base/label_acc": 0.5, "heldout/ft/label_acc": 0.9,
            "heldout/delta/label_acc": 0.4}
    bench = {"eval/base/mmlu/acc": 0.3, "eval/ft/mmlu/acc": 0.28, "forgetting/mmlu/delta": -0.02,
             "eval/base/mmlu/n": 285.0}
    out = report([held, bench], out_dir=tmp_path)
    rows = {r["measure"]: r for r in out["rows"]}
    assert set(rows) == {"held-out exact_match", "held-out label_acc", "mmlu acc"}  # bbh absent: not run
    assert rows["mmlu acc"] == {"measure": "mmlu acc", "base": 0.3, "fine-tuned": 0.28, "delta": -0.02, "n": 285}
    assert rows["held-out exact_match"]["n"] == 40
    assert "| mmlu acc | 0.300 | 0.280 | -0.020 | 285 |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == out["rows"]
