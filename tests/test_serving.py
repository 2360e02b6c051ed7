"""The registered champion as a real MLflow Model: loads from `models:/NAME@champion` in a fresh process and
answers chat requests over HTTP from `mlflow models serve`, exactly as generating with the model directly."""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_registry import PASS, fp, pipeline_run

from sftflow.models import load_causal_lm, load_tokenizer
from sftflow.release import registry, serving
from sftflow.stack.servers import free_port
from sftflow.tasks.evaluation.heldout import generate

# Each test trains a tiny model and registers it; most start a fresh process or a server.
pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Is the sky green? Answer yes or no."}]
MAX_TOKENS = 12


def champion_of(tmp_path, method="lora", metrics=None) -> tuple[str, Path]:
    """A candidate registered as champion -> (model name, the train stage's weights folder)."""
    name = f"serve-{uuid.uuid4().hex[:8]}"
    registry.register_candidate(name, pipeline_run(tmp_path, method=method, metrics=metrics), PASS, fp("a"), {})
    kind = "adapter" if method == "lora" else "model"
    return name, next(tmp_path.glob(f"*/{kind}"))


def direct_answer(weights: Path) -> str:
    """Greedy generation with the same weights and chat template, as the held-out evaluation does it."""
    tok = load_tokenizer(str(weights))
    if (weights / "adapter_config.json").exists():
        base = json.loads((weights / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = load_causal_lm(base, adapter=str(weights))
    else:
        model = load_causal_lm(str(weights))
    return generate(model.eval(), tok, [MESSAGES], MAX_TOKENS, 1)[0]


LOAD_AND_ANSWER = """
import json, sys, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict({"messages": json.loads(sys.argv[2]), "max_tokens": int(sys.argv[3])})
print("ANSWER=" + json.dumps(out[0]["choices"][0]["message"]["content"]))
"""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_champion_loads_in_one_line_in_a_fresh_process(tmp_path, method):
    name, weights = champion_of(tmp_path, method, metrics={"heldout/delta/label_acc": 0.25,
                                                           "forgetting/mmlu/delta": -0.01, "train/loss": 1.0})
    done = subprocess.run([sys.executable, "-c", LOAD_AND_ANSWER, serving.model_uri(name), json.dumps(MESSAGES),
                           str(MAX_TOKENS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.split("ANSWER=")[-1])
    assert answer == direct_answer(weights)


def test_the_logged_model_is_a_self_contained_chat_model_linked_to_its_metrics(tmp_path):
    name, _ = champion_of(tmp_path, metrics={"heldout/delta/label_acc": 0.25, "forgetting/mmlu/delta": -0.01,
                                             "train/loss": 1.0})
    version = registry.champion(name)
    client = MlflowClient()
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics} == {"heldout/delta/label_acc": 0.25, "forgetting/mmlu/delta": -0.01}
    assert client.get_experiment(logged.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    local = Path(mlflow.artifacts.download_artifacts(version.source))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["transformers"]
    assert flavor["peft_adaptor"] == "peft" and "local_base_model_path" not in flavor  # base weights inside
    assert "python_function" in mlmodel["flavors"] and mlmodel["signature"]["inputs"]
    assert "messages" in (local / "input_example.json").read_text()
    assert (local / "components/tokenizer/chat_template.jinja").exists()
    files = [p for p in local.rglob("*") if p.is_file()]
    weights = [p.name for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert sorted(weights) == ["adapter_model.safetensors", "model.safetensors"], weights  # safetensors only


def test_sftflow_serve_answers_a_chat_request_like_direct_generation_until_interrupted(tmp_path):
    """`sftflow serve` runs `mlflow models serve` (serving.served) until Ctrl-C, then stops it."""
    name, weights = champion_of(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "cli.log"
    with log.open("w") as out:
        # Ctrl-C as at a terminal, also where this test runs in a background job (its SIGINT may be ignored)
        proc = subprocess.Popen([sys.executable, "-m", "sftflow.cli", "serve", name, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        serving.wait_ready(url, proc, log)
        deadline = time.monotonic() + 30
        while "serving models:/" not in log.read_text() and time.monotonic() < deadline:  # the command's own check
            time.sleep(0.2)
        answer = serving.chat(url, MESSAGES, max_tokens=MAX_TOKENS)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert f"serving models:/{name}@champion at {url}/invocations" in " ".join(out.split())
    assert answer == direct_answer(weights)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/ping", timeout=2)
    assert "--host 127.0.0.1" in " ".join(serving.serve_command("models:/x@champion", 5001))
