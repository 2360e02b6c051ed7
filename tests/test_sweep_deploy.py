"""The `sweep` deployment: a typed run form in the Prefect UI, fenced like the retrain deployments (its space
file and every trial's values too). Runs are created from the deployment as the UI's Run button does and executed
by Prefect's flow engine in this process; each refusal comes before any trial trains."""

import pytest
from conftest import deployed

from sftflow import env
from sftflow.flows.sweep import sweep

SMOKE = "configs/smoke.yaml"


@pytest.fixture(scope="module")
def deployments(prefect_server):
    with deployed("sweep-pool") as applied:
        yield applied


def run_from(parameters: dict):
    from prefect import get_client
    from prefect.flow_engine import run_flow

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sftflow-sweep/sweep")
        flow_run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
    return run_flow(sweep, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")


def test_the_sweep_deployment_has_a_typed_form(deployments):
    from prefect import get_client

    assert "sftflow-sweep/sweep" in deployments
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sftflow-sweep/sweep")
    form = dep.parameter_openapi_schema["properties"]
    assert {"config_file", "space_file", "n_trials", "overrides", "register_best"} <= set(form)
    assert any(t.get("type") == "integer" for t in form["n_trials"].get("anyOf", [form["n_trials"]]))
    assert form["register_best"]["type"] == "boolean" and dep.parameters["space_file"] == "configs/sweep_demo.yaml"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1


@pytest.mark.parametrize("space, overrides, expected", [
    ("{tmp}/space.yaml", [], "space.yaml is outside the allowed roots"),  # the space file itself
    ("configs/sweep_demo.yaml", ["data.root={tmp}"], "data.root = {tmp} is outside"),  # the form's overrides
])
def test_a_form_run_is_refused_a_space_file_or_override_outside_the_roots(deployments, tmp_path, space, overrides,
                                                                          expected):
    (tmp_path / "space.yaml").write_text("sampler: grid\nparams:\n  train.lora.r: [2]\n")
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    runs = env.state_dir() / "runs"
    before = set(runs.glob("*")) if runs.exists() else set()
    state = run_from({"config_file": SMOKE, "space_file": fill(space), "overrides": [fill(o) for o in overrides]})
    assert state.is_failed(), state
    message = str(state.result(raise_on_failure=False))
    assert "refused: a run of deployment 'sweep'" in message and fill(expected) in message, message
    assert (set(runs.glob("*")) if runs.exists() else set()) == before  # refused before any trial ran


def test_each_trials_values_are_fenced_too(tmp_path, data_root):
    """A space file inside the roots may still sample a value outside them: that trial is refused."""
    from sftflow.flows.sweep import _trial_config
    from sftflow.stack.entry import FlowEntry
    from sftflow.stack.fence import Fence, FenceError

    guard = FlowEntry()  # outside a flow run: no deployment, so give it one
    guard.deployment = ("sweep", Fence(roots=[str(data_root)]))
    assert _trial_config(SMOKE, [f"data.root={data_root}"], {"train.lora.r": 2}, guard).train.lora.r == 2
    with pytest.raises(FenceError, match="data.root = .* is outside"):
        _trial_config(SMOKE, [f"data.root={data_root}"], {"data.root": str(tmp_path)}, guard)
