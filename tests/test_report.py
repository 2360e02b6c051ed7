import json

from sftflow import stats
from sftflow.configs.schema import GateConfig
from sftflow.tasks.evaluation.forgetting import forgetting_rows
from sftflow.tasks.evaluation.gate import verdict
from sftflow.tasks.evaluation.report import report


def _items(bench, task, scores, category=None):
    return [{"benchmark": bench, "task": task, "category": category, "doc_id": i, "metric": "acc", "score": s}
            for i, s in enumerate(scores)]


def test_report_rows_carry_base_ft_delta_ci_and_the_verdict(tmp_path):
    held = {"heldout/records": 40, "heldout/base/exact_match": 0.25, "heldout/ft/exact_match": 0.9,
            "heldout/delta/exact_match": 0.65, "heldout/delta/exact_match/ci_low": 0.5,
            "heldout/delta/exact_match/ci_high": 0.8, "heldout/delta/exact_match/p_value": 1e-6,
            "heldout/delta/exact_match/mde": 0.2031}
    base = _items("mmlu", "anatomy", [1] * 40 + [0] * 20, "mmlu_stem") + _items("mmlu", "virology", [1, 0] * 10, "mmlu_other")
    ft = _items("mmlu", "anatomy", [0] * 30 + [1] * 10 + [0] * 20, "mmlu_stem") + _items("mmlu", "virology", [1, 0] * 10, "mmlu_other")
    rows = forgetting_rows(base, ft, iters=300)
    gate = verdict({**held, "forgetting/mmlu/delta": -0.375}, GateConfig(target="exact_match",
                                                                         max_forgetting={"mmlu": 0.05}))
    timings = {"heldout/duration_s": 12.4, "benchmarks/duration_s": 95.2, "eval/base/wall_s": 0.0,
               "eval/base/cached_tasks": 84.0, "eval/base/evaluated_tasks": 0.0, "eval/ft/wall_s": 90.1,
               "eval/ft/cached_tasks": 0.0, "eval/ft/evaluated_tasks": 84.0}
    out = report([held, timings], rows, out_dir=tmp_path, verdict=gate)
    by_name = {r["measure"]: r for r in out["rows"]}
    assert list(by_name) == ["held-out exact_match", "mmlu acc", "mmlu_other acc", "mmlu_stem acc"]
    assert by_name["mmlu acc"]["delta"] == -30 / 80 and by_name["mmlu acc"]["n"] == 80
    assert by_name["mmlu_stem acc"]["flag"] == "significant drop" and by_name["mmlu_other acc"]["flag"] == ""
    md = (tmp_path / "summary.md").read_text()
    assert "| held-out exact_match | 0.250 | 0.900 | +0.650 | [+0.500, +0.800] | 1e-06 | 0.203 | 40 |  |" in md
    mde = by_name["mmlu acc"]["mde"]  # 30 of 80 items differ
    assert mde == stats.paired_mde(80, 30 / 80) and f"| {mde:.3f} | 80 |" in md
    assert "**Promotion gate (ft, point): FAILED**" in md and "- FAIL: mmlu forgetting" in md
    assert ("Evaluation wall time: held-out 12 s, benchmarks 95 s (base 0 s, 84/84 tasks cached; "
            "ft 90 s, 0/84 tasks cached)") in md
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["rows"] == out["rows"] and saved["gate"]["passed"] is False


def test_subtask_flags_are_holm_adjusted():
    # Two subtasks with the same borderline drop: each alone is significant, Holm over the pair is not.
    base = _items("bbh", "a", [1] * 8 + [0] * 2) + _items("bbh", "b", [1] * 8 + [0] * 2)
    ft = _items("bbh", "a", [0] * 6 + [1] * 2 + [0] * 2) + _items("bbh", "b", [0] * 6 + [1] * 2 + [0] * 2)
    subs = [r for r in forgetting_rows(base, ft, iters=200) if r["scope"] == "subtask"]
    assert [r["p_value"] for r in subs] == [2 / 2**6] * 2  # exact McNemar, 6 lost vs 0 gained
    assert [r["p_holm"] for r in subs] == [4 / 2**6] * 2 and not any(r["significant_drop"] for r in subs)
    overall = [r for r in forgetting_rows(base, ft, iters=200) if r["scope"] == "benchmark"][0]
    assert overall["significant_drop"]  # 12 lost vs 0 over the whole benchmark is
