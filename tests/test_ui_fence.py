"""The Prefect run form is a remote entry point: deployment runs are fenced by the deployment's own `allow:`
section, and secrets never reach MLflow.

Deployments are created by `sftflow.stack.deployments.apply` on a real Prefect server (test harness) with a process work
pool; each run is created from its deployment exactly as the UI's Run button does and executed by Prefect's
flow engine in this process (the worker's subprocess would run the same engine on the same flow run).
"""

import json
import uuid
from pathlib import Path

import pytest
from conftest import deployed
from test_registry import pipeline_run

from sftflow import env
from sftflow.configs.loader import load_config
from sftflow.flows.retrain import fingerprint, resolve_config, retrain
from sftflow.release import registry
from sftflow.stack.deployments import DeploymentSpec
from sftflow.stack.fence import Fence, violations

REPO = Path(__file__).resolve().parents[1]
SMOKE = "configs/smoke.yaml"


@pytest.fixture(scope="module")
def deployments(prefect_server):
    """`sftflow deploy`'s deployments (adhoc, nightly as shipped, and one allowing trust_remote_code)."""
    with deployed("fence-pool", {"trusting": DeploymentSpec(allow=Fence(trust_remote_code=True))}) as applied:
        yield applied


def run_from(deployment: str, parameters: dict):
    """Create a flow run from the deployment with the form's parameters and run it; -> its final state."""
    from prefect import get_client
    from prefect.flow_engine import run_flow

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"sftflow-retrain/{deployment}")
        flow_run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
    return run_flow(retrain, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")


def refusal(state) -> str:
    assert state.is_failed(), state
    message = str(state.result(raise_on_failure=False))
    assert "refused: a run of deployment" in message and "allow:" in message, message
    return message


def test_deploy_writes_each_deployments_fence_into_its_tags(deployments):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        tags = {name: client.read_deployment_by_name(f"sftflow-retrain/{name}").tags
                for name in ("adhoc", "nightly", "trusting")}
    shipped = Fence.from_tags(tags["adhoc"])
    assert shipped.roots == [str(REPO / "configs"), str((REPO / "../shared/data").resolve())]
    assert not shipped.trust_remote_code and not shipped.pickle_weights
    assert Fence.from_tags(tags["trusting"]).trust_remote_code and "sftflow" in tags["adhoc"]


@pytest.fixture
def outside(tmp_path, data_root):
    """A valid config, benchmark originals (symlinked) and a model folder with pickle weights, all outside
    the allowed roots."""
    (tmp_path / "outside.yaml").write_text((REPO / SMOKE).read_text())
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("mmlu", "bbh"):
        (bench / name).symlink_to(data_root / name)
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(b"not really weights")
    (tmp_path / "link-to-tmp").symlink_to(tmp_path)
    return tmp_path


FORBIDDEN = {
    "trust_remote_code": ({"overrides": ["model.trust_remote_code=true"]}, "model.trust_remote_code = true"),
    "absolute config": ({"config_file": "{tmp}/outside.yaml"}, "outside.yaml is outside the allowed roots"),
    "dot-dot config": ({"config_file": "configs/../pyproject.toml"}, "pyproject.toml is outside the allowed roots"),
    "data root": ({"overrides": ["data.root={tmp}"]}, "data.root = {tmp} is outside"),
    "dot-dot source": ({"sources": [{"path": "../../../etc/hostname"}]}, "data.sources[0].path"),
    "absolute source": ({"sources": [{"path": "/etc/hostname"}]}, "data.sources[0].path = /etc/hostname"),
    "benchmark root": ({"overrides": ["eval.benchmark_root={tmp}/bench"]}, "eval.benchmark_root = {tmp}/bench"),
    "template": ({"overrides": ["template.chat_template={tmp}/evil.jinja"]}, "template.chat_template"),
    "pickle weights": ({"model": "{tmp}/pickled"}, "holds pickle weights (pytorch_model.bin)"),
}


@pytest.mark.parametrize("case", list(FORBIDDEN))
def test_a_deployment_run_is_refused_what_its_deployment_does_not_allow(case, deployments, outside):
    params, expected = json.loads(json.dumps(FORBIDDEN[case][0]).replace("{tmp}", str(outside))), FORBIDDEN[case][1]
    runs = env.state_dir() / "runs"
    before = set(runs.glob("*"))
    state = run_from("adhoc", {"config_file": SMOKE, **params})
    assert expected.replace("{tmp}", str(outside)) in refusal(state)
    assert set(runs.glob("*")) == before  # refused before any work: no pipeline run folder


def test_dot_dot_and_symlinks_are_resolved_before_the_roots_are_checked(tmp_path, data_root):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "data" / "link").symlink_to(elsewhere)  # inside the root by name, outside it for real
    fence = Fence(roots=[str(root)])
    ok = load_config(REPO / SMOKE, [f"data.root={root / 'data'}", f"eval.benchmark_root={data_root}"])
    assert [v for v in violations(ok, fence) if "data." in v] == []
    for bad in (f"data.root={root / 'data' / 'link'}", f"data.root={root / 'data' / '..' / '..' / 'elsewhere'}"):
        cfg = load_config(REPO / SMOKE, [bad])
        assert any(v.startswith("data.root") for v in violations(cfg, fence)), bad
    ok.data.sources[0].path = "link/*.json"  # a glob under the link
    assert any(v.startswith("data.sources[0].path") for v in violations(ok, fence))


def test_traffic_the_monitor_admitted_passes_the_retrain_fence_and_nothing_else_there_does(tmp_path, data_root):
    from sftflow.flows.monitor import admit_traffic
    from sftflow.stack.fence import admitted_traffic

    users = tmp_path / "where-users-keep-traffic"
    users.mkdir()
    (users / "traffic.jsonl").write_text('{"messages": []}\n')
    fence = Fence(roots=[str(REPO / "configs"), str(data_root)])
    cfg = load_config(REPO / SMOKE, [f"data.root={data_root}", f"eval.benchmark_root={data_root}"])
    cfg.data.sources[0].path = str(users / "traffic.jsonl")
    assert any(v.startswith("data.sources[0].path") for v in violations(cfg, fence))  # as the user keeps it
    copy = admit_traffic(users / "traffic.jsonl")
    assert copy.parent == admitted_traffic() and copy.read_bytes() == (users / "traffic.jsonl").read_bytes()
    assert admit_traffic(users / "traffic.jsonl") == copy  # named by content: admitted once
    cfg.data.sources[0].path = str(copy)
    assert violations(cfg, fence) == []
    # a glob there, or a path that only passes through the folder by name, is still fenced
    for path in (str(admitted_traffic() / "*.jsonl"), str(admitted_traffic() / ".." / ".." / "elsewhere.jsonl")):
        cfg.data.sources[0].path = path
        assert any(v.startswith("data.sources[0].path") for v in violations(cfg, fence)), path


def test_what_the_deployment_allows_runs_and_plain_runs_are_not_fenced(deployments, tmp_path, data_root):
    overrides = [f"data.root={data_root}", "name=fence-allowed", "model.trust_remote_code=true"]
    cfg = resolve_config(SMOKE, overrides, None, None, None)
    registry.register_candidate(cfg.name, pipeline_run(tmp_path), {"passed": True, "reasons": []}, fingerprint(cfg), {})
    # Up to date: the fence let it through, and nothing needs training.
    allowed = run_from("trusting", {"config_file": SMOKE, "overrides": overrides})
    assert allowed.is_completed() and allowed.name == "UpToDate", allowed
    refusal(run_from("adhoc", {"config_file": SMOKE, "overrides": overrides}))  # the same form, another deployment
    plain = retrain(config_file=SMOKE, overrides=overrides, return_state=True)  # `sftflow run`-like: no fence
    assert plain.is_completed() and plain.name == "UpToDate", plain


@pytest.mark.e2e
def test_secrets_reach_no_mlflow_param_tag_or_artifact(deployments, tmp_path, monkeypatch, data_root):
    """A real data-stage flow run with secrets in the environment, pasted into a config value, and under a
    secret-looking key: none of their values is anywhere in MLflow's database or artifact folder."""
    import mlflow

    from sftflow.configs.loader import load_config
    from sftflow.flows.sft_pipeline import curate_pipeline

    token, password, keyed = f"hf_{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}", "0.7315942861"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    cfg = load_config(REPO / SMOKE, [f"data.root={data_root}", "tracking.experiment=secrets",
                                     f"template.system_prompt=Answer. ({token} {password})",
                                     f"gate.max_forgetting.hub_api_key={keyed}"])
    result = curate_pipeline(config=cfg)
    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.params["gate.max_forgetting.hub_api_key"] == "***"  # logged, masked
    assert run.data.params["template.system_prompt"] == "Answer. (*** ***)"
    state = env.state_dir()
    stores = [state / "mlflow.db", *(p for p in (state / "mlartifacts").rglob("*") if p.is_file()),
              *(p for p in Path(result["run_dir"]).rglob("*") if p.is_file())]
    assert any(p.name == "config.yaml" for p in stores)
    for secret in (token, password, keyed):
        assert not [str(p) for p in stores if secret.encode() in p.read_bytes()], secret


def test_redaction_masks_secret_keys_env_values_and_url_passwords_but_not_token_counts(monkeypatch):
    from sftflow.configs.loader import flatten
    from sftflow.redact import scrub

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a setting named like a token: not a secret
    flat = flatten({"curate": {"max_tokens": 512}, "model": {"hub_token": "x1", "api_key": None},
                    "tracking": {"uri": "https://bob:s3cret@mlflow.example/x"}, "note": "uses hf_abcdefgh123 here",
                    "eval": {"heldout": {"max_new_tokens": 8}}, "flag": "false"})
    assert flat == {"curate.max_tokens": "512", "model.hub_token": "***", "model.api_key": "***",
                    "tracking.uri": "https://bob:***@mlflow.example/x", "note": "uses *** here",
                    "eval.heldout.max_new_tokens": "8", "flag": "false"}
    assert scrub("plain text") == "plain text"
