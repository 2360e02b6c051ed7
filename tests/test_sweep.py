"""Sweep parts without a pipeline: the space file, the trial score (the gate's measures) and the Pareto front."""

from pathlib import Path

import pytest

from sftflow import metrics as names
from sftflow.configs.schema import GateConfig
from sftflow.sweeps import pareto
from sftflow.sweeps import space

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sweeps"
REPO = Path(__file__).resolve().parents[1]


def test_a_grid_file_runs_every_grid_point_and_overrides_keep_types():
    spec = space.load_spec(FIXTURES / "grid.yaml")
    assert spec.sampler == "grid" and spec.trials() == 4
    assert space.overrides({"train.lora.r": 4, "train.learning_rate": 1e-3}) == \
        ["train.lora.r=4", "train.learning_rate=0.001"]
    assert space.load_spec(FIXTURES / "grid.yaml", n_trials=2).trials() == 2


def test_the_command_line_set_wins_over_the_space_files_overrides(tmp_path):
    from sftflow.configs.loader import load_config

    file = tmp_path / "space.yaml"
    file.write_text("sampler: grid\nparams: {train.lora.r: [4]}\noverrides: [eval.mmlu.limit=3, eval.bbh.limit=2]\n")
    cfg = load_config(REPO / "configs" / "smoke.yaml", space.every_trial(space.load_spec(file), ["eval.mmlu.limit=5"]))
    assert (cfg.eval.mmlu.limit, cfg.eval.bbh.limit) == (5, 2)


def test_the_demo_space_is_a_2x2_grid_under_a_sweep_section():
    spec = space.load_spec(REPO / "configs" / "sweep_demo.yaml")
    assert spec.grid() == {"train.lora.r": [4, 16], "train.learning_rate": [3e-4, 1e-3]} and spec.trials() == 4


def test_distributions_map_to_optuna():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    d = space.distributions(space.load_spec(FIXTURES / "tpe.yaml"))
    assert d["train.learning_rate"] == FloatDistribution(1e-4, 3e-3, log=True)
    assert d["train.lora.r"] == IntDistribution(2, 8, step=2)
    assert d["train.lora.dropout"] == CategoricalDistribution([0.0, 0.1])


@pytest.mark.parametrize("text, message", [
    ("sampler: grid\nparams: {train.learning_rate: {type: float, low: 0.1, high: 1}}", "takes lists of values"),
    ("sampler: tpe\nparams: {train.lora.r: [2, 4]}", "needs n_trials"),
    ("n_trials: 2\nparams: {train.lora.r: {type: int, low: 8, high: 2}}", "low 8 > high 2"),
    ("n_trials: 2\nparams: {train.lora.r: {type: normal, mu: 1}}", "params.train.lora.r"),
    ("sampler: grid\nparams: {}", "params"),
])
def test_a_bad_space_is_one_clear_user_error(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(space.SweepError, match="invalid sweep space") as err:
        space.load_spec(path)
    assert message in str(err.value)


def metrics(gain: float, mmlu: float | None, bbh: float | None) -> dict:
    out = {names.heldout_delta("label_acc"): gain, names.heldout_delta("label_acc", "ci_low"): gain - 0.1}
    for bench, delta in (("mmlu", mmlu), ("bbh", bbh)):
        if delta is not None:
            out[names.forgetting(bench, "delta")] = delta
            out[names.forgetting(bench, "ci_low")] = delta - 0.2
    return out


def test_the_score_is_the_gates_gain_and_each_benchmarks_drop_beyond_its_allowance():
    gate = GateConfig(min_gain=0.05, max_forgetting={"mmlu": 0.05, "bbh": 0.10})
    s = pareto.score(metrics(0.2, -0.02, -0.15), gate)
    assert s["gain"] == 0.2 and s["worst_forgetting"] == pytest.approx(0.15)
    assert s["constraints"] == pytest.approx([-0.03, 0.05]) and not s["feasible"] and not s["passed"]
    ok = pareto.score(metrics(0.2, 0.01, -0.05), gate)
    assert ok["feasible"] and ok["passed"] and ok["worst_forgetting"] == pytest.approx(0.05)
    small_gain = pareto.score(metrics(0.01, 0.0, 0.0), gate)
    assert small_gain["feasible"] and not small_gain["passed"]  # feasible on forgetting, gain below the minimum
    unmeasured = pareto.score(metrics(0.2, 0.0, None), gate)
    assert unmeasured["constraints"][1] == pareto.UNMEASURED and not unmeasured["feasible"]
    unbounded = pareto.score(metrics(0.2, -0.5, -0.5), gate.model_copy(update={"max_forgetting": {}}))
    assert unbounded["worst_forgetting"] == 0.0 and unbounded["constraints"] == [] and unbounded["feasible"]
    pessimistic = pareto.score(metrics(0.2, 0.0, 0.0), gate.model_copy(update={"bound": "ci"}))
    assert pessimistic["gain"] == pytest.approx(0.1) and pessimistic["worst_forgetting"] == pytest.approx(0.2)


def result(trial, gain, worst, passed=False):
    return {"trial": trial, "params": {"r": trial}, "gain": gain, "worst_forgetting": worst, "passed": passed,
            "feasible": passed, "state": "COMPLETE", "run_id": f"run{trial}"}


def test_the_pareto_front_holds_exactly_the_non_dominated_trials():
    results = [result(0, 0.10, 0.00), result(1, 0.20, 0.05), result(2, 0.15, 0.06),  # 2: dominated by 1
               result(3, 0.30, 0.20), result(4, 0.10, 0.01),  # 4: dominated by 0 (same gain, more forgetting)
               result(5, 0.30, 0.20),  # a tie with 3: neither dominates, both stay
               {"trial": 6, "params": {"r": 6}, "gain": None, "worst_forgetting": None, "state": "FAIL"}]
    assert [r["trial"] for r in pareto.pareto_front(results)] == [0, 1, 3, 5]
    assert pareto.pareto_front([]) == []


def test_the_best_trial_passes_the_gate_with_the_largest_gain_and_less_forgetting_on_ties():
    results = [result(0, 0.30, 0.20), result(1, 0.20, 0.04, True), result(2, 0.20, 0.01, True),
               result(3, 0.10, 0.00, True)]
    assert pareto.best(results)["trial"] == 2
    assert pareto.best([result(0, 0.3, 0.2)]) is None


def test_the_table_lists_trials_by_gain_with_the_front_marked_and_failures_last():
    results = [result(0, 0.10, 0.00, True), result(1, 0.15, 0.06),
               {"trial": 2, "params": {"r": 2}, "gain": None, "worst_forgetting": None, "state": "FAIL",
                "run_id": None}]
    lines = pareto.table(results, ["r"]).splitlines()
    assert lines[0] == "| trial | r | gain | worst forgetting | feasible | gate | Pareto | state | MLflow run |"
    assert lines[2] == "| 1 | 1 | +0.1500 | +0.0600 | no | failed | ★ | COMPLETE | run1 |"
    assert lines[3] == "| 0 | 0 | +0.1000 | +0.0000 | yes | passed | ★ | COMPLETE | run0 |"
    assert lines[4] == "| 2 | 2 | — | — | — | — |  | FAIL | — |"


def test_the_cli_refuses_a_bad_space_with_one_message_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from sftflow.cli.app import app

    assert "--n-trials" in CliRunner().invoke(app, ["sweep", "--help"]).output
    path = tmp_path / "space.yaml"
    path.write_text("sampler: grid\nparams: {train.lora.r: []}\n")
    result = CliRunner().invoke(app, ["sweep", str(REPO / "configs" / "smoke.yaml"), str(path)])
    assert result.exit_code == 2 and "an empty list of values" in result.output and "Traceback" not in result.output


def test_the_pareto_plot_draws_trials_the_front_and_the_allowance(tmp_path):
    from sftflow import charts

    points = [{**result(0, 0.1, 0.0, True), "pareto": True}, {**result(1, 0.05, 0.08), "pareto": False},
              {**result(2, 0.2, 0.1), "pareto": True}]
    path = charts.plot_pareto(points, tmp_path / "pareto.png", max_drop=0.05)
    assert path.stat().st_size > 10_000
