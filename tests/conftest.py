"""Test environment: a throwaway state dir (Prefect home, MLflow SQLite, models), offline mode on.

Set before anything imports prefect/mlflow/transformers, which read these variables at import time.
"""

import contextlib
import os
import tempfile
from pathlib import Path

os.environ["SFTFLOW_HOME"] = tempfile.mkdtemp(prefix="sftflow-test-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_HOME", None)
# The same numbers on every CI machine: `auto` would train and evaluate in bf16 on CPUs with AMX/AVX512-BF16 and in
# fp32 on the others. The bf16 paths have tests of their own that ask for bf16 explicitly.
os.environ["SFTFLOW_CPU_BF16"] = "0"

from sftflow import env, prefect_db  # noqa: E402

env.configure(offline=True)
# Flows called in-process start Prefect's own ephemeral server on the state dir: on a seeded database it skips the
# migrations.
prefect_db.seed(Path(os.environ["PREFECT_HOME"]) / "prefect.db")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
# The suite runs on CPU (CI) and on a CUDA machine: assertions about one kind of hardware say so.
cpu_only = pytest.mark.skipif(CUDA, reason="asserts CPU-only behaviour; this machine has CUDA")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    assert SHARED_DATA.is_dir(), f"tests need the shared data folder beside the repo: {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """A tiny random Llama + byte-level BPE tokenizer with a ChatML template, built once per session."""
    from sftflow.models import pull

    return str(pull("tiny-random-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from sftflow.models import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def opinionated_model(tiny_model):
    """The tiny model with larger random weights: its greedy outputs differ from prompt to prompt, so a generation
    path that mixes prompts up, or shifts their positions, shows."""
    import torch

    from sftflow.models import load_causal_lm

    model = load_causal_lm(tiny_model).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def make_record(i: int, user: str, answer: str, label: str | None = None, source: str = "src") -> dict:
    return {"id": f"r{i:04d}", "messages": chat(user, answer), "label": label, "source": source,
            "file": "f.jsonl", "index": i + 1, "meta": {}}


def template_splits(d: Path, model: str, train: list[dict], val: list[dict], max_length: int = 256) -> dict:
    """Train/val records written to d and run through the real template stage -> its result (paths, metrics)."""
    from sftflow.configs.schema import TemplateConfig
    from sftflow.records import write_jsonl
    from sftflow.tasks.training.template import template

    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "val.jsonl", val)
    return template({"train": str(d / "train.jsonl"), "val": str(d / "val.jsonl")}, model,
                    TemplateConfig(max_length=max_length), out_dir=d)


def review_splits(d: Path, model: str, n: int, n_val: int, text: str) -> dict:
    """n two-label review records (`text` formatted with i and great/awful; the last n_val for validation)
    through the real template stage -> its paths."""
    recs = [make_record(i, text.format(i=i, word="great" if i % 2 else "awful"), "POS" if i % 2 else "NEG")
            for i in range(n)]
    return template_splits(d, model, recs[:n - n_val], recs[n - n_val:])["paths"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tiny_model):
    """40 review records (32 train, 8 val) through the real template stage -> its paths."""
    return review_splits(tmp_path_factory.mktemp("tok"), tiny_model, 40, 8, "Review {i}: the film was {word}.")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (subprocess) for the session, on a copy of the migrated template database: each
    server on a fresh database would spend about a minute migrating it. Tests give their flows, pools and
    deployments names of their own, so they share it safely."""
    from unittest import mock

    from prefect.testing.utilities import prefect_test_harness

    from sftflow import prefect_db

    folder = tmp_path_factory.mktemp("prefect-server")
    prefect_db.seed(folder / "prefect-test.db")  # the file name the harness uses in its folder
    with mock.patch("prefect.testing.utilities.mkdtemp", return_value=str(folder)):
        with prefect_test_harness(server_startup_timeout=None):
            yield


@contextlib.contextmanager
def deployed(pool: str, extra_specs: dict | None = None):
    """`sftflow deploy` of deployments/deployments.yaml (plus `extra_specs`) on the session's Prefect server with a
    process work pool `pool` -> apply()'s result. Needs the `prefect_server` fixture."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from sftflow.cli.operations import deployable_flows
    from sftflow.stack.deployments import apply, load_specs

    cwd = os.getcwd()
    os.chdir(REPO)  # allow.roots are relative to where `deploy` runs
    try:
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        yield apply({**load_specs(REPO / "deployments/deployments.yaml"), **(extra_specs or {})}, deployable_flows(),
                    pool)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def token_paths(tmp_path_factory, tiny_model):
    """Templated train/val splits of 24 tiny review records (20 train, 4 val: the training tests' data)."""
    return review_splits(tmp_path_factory.mktemp("tok"), tiny_model, 24, 4, "Review {i}: {word} film.")
