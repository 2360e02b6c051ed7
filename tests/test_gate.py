import json

import pytest

from sftflow.configs.loader import ConfigError, load_config
from sftflow.configs.schema import GateConfig
from sftflow.tasks.evaluation.gate import gate, verdict

METRICS = {"heldout/delta/label_acc": 0.30, "heldout/delta/label_acc/ci_low": 0.12,
           "forgetting/mmlu/delta": -0.02, "forgetting/mmlu/ci_low": -0.07,
           "forgetting/bbh/delta": -0.04, "forgetting/bbh/ci_low": -0.15}


def test_point_estimates_pass_within_the_limits():
    out = verdict(METRICS, GateConfig(min_gain=0.1, max_forgetting={"mmlu": 0.05, "bbh": 0.05}))
    assert out["passed"] is True and len(out["reasons"]) == 3
    assert out["reasons"][0] == "held-out label_acc gain: delta +0.3000 >= +0.1000"


def test_the_pessimistic_ci_bound_is_stricter():
    out = verdict(METRICS, GateConfig(min_gain=0.1, max_forgetting={"mmlu": 0.05, "bbh": 0.05}, bound="ci"))
    assert out["passed"] is False
    failed = [c for c in out["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == ["forgetting:mmlu", "forgetting:bbh"]
    assert failed[0]["metric"] == "forgetting/mmlu/ci_low" and "CI lower bound -0.0700 < -0.0500" in failed[0]["reason"]


def test_too_little_gain_or_too_much_forgetting_fails_with_its_reason():
    out = verdict(METRICS, GateConfig(min_gain=0.5, max_forgetting={"bbh": 0.03}))
    assert out["passed"] is False
    assert [c["passed"] for c in out["checks"]] == [False, False]
    assert "bbh forgetting: delta -0.0400 < -0.0300" in out["reasons"]


def test_a_benchmark_that_was_not_measured_fails_the_gate():
    out = verdict({"heldout/delta/label_acc": 0.3}, GateConfig(max_forgetting={"mmlu": 0.05}))
    assert out["passed"] is False and "mmlu: not measured" in out["reasons"][1]


def test_another_model_is_judged_by_its_own_metrics():
    metrics = {"heldout/delta/ft_best/exact_match": 0.2, "forgetting/ft_best/mmlu/delta": -0.01}
    out = verdict(metrics, GateConfig(model="ft_best", target="exact_match", max_forgetting={"mmlu": 0.02}))
    assert out["passed"] is True


def test_gate_stage_writes_the_verdict(tmp_path):
    out = gate([METRICS], GateConfig(max_forgetting={"mmlu": 0.01}), out_dir=tmp_path)
    assert out["metrics"] == {"gate/passed": 0.0} and out["params"]["gate.verdict"] == "failed"
    saved = json.loads((tmp_path / "gate.json").read_text())
    assert saved["passed"] is False and saved["reasons"] == out["reasons"]


def test_gate_config_is_validated():
    with pytest.raises(ConfigError, match="gate.max_forgetting.mmlu"):
        load_config("configs/smoke.yaml", ["gate.max_forgetting={mmlu: -0.1}"])
    with pytest.raises(ConfigError, match="gate.bound"):
        load_config("configs/smoke.yaml", ["gate.bound=upper"])


def test_an_underpowered_forgetting_check_says_which_drop_it_cannot_rule_out():
    metrics = {**METRICS, "forgetting/mmlu/mde": 0.09, "forgetting/bbh/mde": 0.04,
               "heldout/delta/label_acc/mde": 0.2, "heldout/delta/label_acc/ci_low": 0.05}
    out = verdict(metrics, GateConfig(min_gain=0.1, max_forgetting={"mmlu": 0.05, "bbh": 0.05}))
    gain, mmlu, bbh = out["checks"]
    assert out["passed"] is True  # point estimates: the note informs, it does not fail the check
    assert mmlu["underpowered"] and mmlu["reason"] == ("mmlu forgetting: delta -0.0200 >= -0.0500; underpowered "
                                                      "(MDE 0.0900 > margin 0.0500): cannot rule out a drop of 0.0700")
    assert not bbh["underpowered"] and "underpowered" not in bbh["reason"]  # MDE within the margin
    assert gain["underpowered"] and "a gain smaller than 0.2000 may go undetected" in gain["reason"]


def test_non_inferiority_settled_by_the_ci_is_not_underpowered():
    metrics = {"heldout/delta/label_acc": 0.3, "heldout/delta/label_acc/ci_low": 0.2,
               "heldout/delta/label_acc/mde": 0.15, "forgetting/mmlu/delta": 0.0,
               "forgetting/mmlu/ci_low": -0.03, "forgetting/mmlu/mde": 0.08}
    out = verdict(metrics, GateConfig(min_gain=0.1, max_forgetting={"mmlu": 0.05}, bound="ci"))
    assert out["passed"] is True and not any(c["underpowered"] for c in out["checks"])
    metrics["forgetting/mmlu/ci_low"] = -0.12  # the CI now reaches past the margin
    out = verdict(metrics, GateConfig(min_gain=0.1, max_forgetting={"mmlu": 0.05}, bound="ci"))
    assert out["passed"] is False and out["reasons"][1].endswith("cannot rule out a drop of 0.1200")


def test_a_champion_comparison_of_another_model_than_ft_fails_as_not_measured():
    metrics = {"heldout/delta/ft_best/exact_match": 0.2, "forgetting/ft_best/mmlu/delta": -0.01,
               "champion/delta/exact_match": 0.5, "champion/delta/mmlu": 0.0}  # these are ft's, not ft_best's
    out = verdict(metrics, GateConfig(model="ft_best", target="exact_match", max_forgetting={"mmlu": 0.02}),
                  champion={"version": "3"})
    assert not out["passed"]
    assert out["reasons"][-1] == "vs champion v3: not measured for `ft_best` (only `ft` is compared with the champion)"
