# sftflow for GPU clusters: the image of the Kubernetes work pool's flow-run pods (deployments/README.md,
# "Kubernetes work pool"). CUDA runtime + cuDNN of the CUDA release torch's wheels are built for (they bring their own
# CUDA libraries; the build checks that the two agree). CUDA 13 needs an NVIDIA driver >= 580 and a card of compute
# capability 7.5 or newer (no V100). `python benchmarks/gpu_check.py` runs in the image.
#   docker build -t registry.example.com/sftflow:0.1.0 .
#   sftflow deploy --pool sftflow-gpu --image registry.example.com/sftflow:0.1.0
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SFTFLOW_HOME=/var/lib/sftflow

# Ubuntu's own builds move with the base image tag, which is pinned; build-essential compiles the Triton
# kernels liger-kernel and bitsandbytes JIT on first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sftflow
COPY pyproject.toml README.md ./
COPY sftflow ./sftflow
COPY flows ./flows
COPY tasks ./tasks
COPY configs ./configs
COPY deployments ./deployments
COPY benchmarks ./benchmarks
COPY tests ./tests

# The gpu extra: bitsandbytes (QLoRA) and liger-kernel; the test extra: pytest, for gpu_check's test run. torch is
# the newest release tested (README, "Tested versions"), whose Linux wheels are built for CUDA 13.0; the other
# versions are the ranges in pyproject.toml (this is the project itself, not a third-party package).
# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir ".[gpu,test]" "torch==2.13.0" \
    && python -c "import sftflow.flows.retrain, sftflow.flows.monitor" \
    && python -c "import os, torch; base = os.environ['CUDA_VERSION'].rsplit('.', 1)[0]; \
assert torch.version.cuda == base, f'torch built for CUDA {torch.version.cuda}, base image CUDA {base}'"

# Flow runs and `mlflow models serve` need no root; state (models, caches, runs) lives in a volume.
RUN useradd --create-home --uid 1000 sftflow && mkdir -p "$SFTFLOW_HOME" && chown sftflow "$SFTFLOW_HOME"
USER 1000
VOLUME ["/var/lib/sftflow"]
# Relative config paths (configs/demo.yaml) resolve here, as on a process worker in the project directory.
WORKDIR /opt/sftflow
CMD ["sftflow", "--help"]
