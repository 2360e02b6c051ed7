"""The champion beside the candidate: its weights, the items it was judged on, and its cached results.

A candidate of a model name that has a champion is evaluated on the champion's frozen test items (recorded in
the history when the champion was registered, sftflow/history.py) plus this data's own test split, and on the
same benchmark items; the champion's results on its frozen items come from the evaluation caches, keyed by its
content, and are never recomputed silently: missing or damaged ones stop the run with what is missing and how
to re-baseline (`gate.vs_champion.rebaseline`), which evaluates the champion again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sftflow import cache, env, history
from sftflow.configs.schema import PipelineConfig
from sftflow.errors import UserError
from sftflow.models import model_digest
from sftflow.records import read_jsonl, write_jsonl
from sftflow.release import registry
from sftflow.release.packaging import WEIGHT_FOLDERS, _base_of
from sftflow.stack.fence import PICKLE_SUFFIXES
from sftflow.tasks.data.dedup.exact import content_key
from sftflow.tasks.evaluation import item_cache, lmeval
from sftflow.tasks.evaluation.mirror import sweep_tasks

REBASELINE = "--set gate.vs_champion.rebaseline=true"
# What the pipeline records on its MLflow run so a later run can find the model it evaluated as "ft".
FT_TAGS = ("sftflow.ft_path", "sftflow.ft_adapter", "sftflow.ft_digest")


class ChampionError(UserError, RuntimeError):
    pass


@dataclass
class Champion:
    name: str
    version: str
    run_id: str  # the pipeline run that trained and judged it
    spec: dict  # the model to evaluate (ModelRef)
    frozen: Path | None  # its history folder: test.jsonl holds the items it was judged on

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "digest": self.spec["digest"]}


def find(name: str, client: MlflowClient | None = None) -> Champion | None:
    """The champion of `name` ready to evaluate, or None when the name has none."""
    client = client or MlflowClient()
    try:
        version = registry.champion(name, client)
    except MlflowException:
        return None
    if version is None:
        return None
    parent = client.get_run(version.tags["mlflow.parent_run_id"])
    spec = _model(client, name, version, parent.data.tags)
    frozen = version.tags.get("sftflow.history")
    return Champion(name, str(version.version), parent.info.run_id, spec, Path(frozen) if frozen else None)


def _model(client: MlflowClient, name: str, version, tags: dict) -> dict:
    """The files its run evaluated, when they are still there unchanged; else its weights from MLflow."""
    path, adapter, digest = (tags.get(t) or None for t in FT_TAGS)
    if path and Path(path).is_dir() and (adapter is None or Path(adapter).is_dir()) \
            and model_digest(path, adapter) == digest:
        return {"path": path, "adapter": adapter, "digest": digest, "tokenizer": tags.get("sftflow.base_path", path)}
    dest = env.state_dir() / "champions" / name / f"v{version.version}"
    if not (dest / ".done").is_file():
        _download(client, version.run_id, "adapter" if adapter else None, dest)
    weights = next(p for p in dest.iterdir() if p.is_dir())
    if (weights / "adapter_config.json").is_file():
        base = _base_of(weights)
        return {"path": base, "adapter": str(weights), "digest": model_digest(base, str(weights)), "tokenizer": base}
    return {"path": str(weights), "adapter": None, "digest": model_digest(str(weights)), "tokenizer": str(weights)}


def _download(client: MlflowClient, train_run_id: str, folder: str | None, dest: Path) -> None:
    from mlflow.artifacts import download_artifacts

    present = {a.path for a in client.list_artifacts(train_run_id)}
    folder = folder or next((f for f in WEIGHT_FOLDERS if f in present), None)
    if folder not in present:
        raise ChampionError(f"MLflow run {train_run_id} (the champion's training) holds no "
                            f"{folder or ' or '.join(WEIGHT_FOLDERS)} weights")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    local = Path(download_artifacts(run_id=train_run_id, artifact_path=folder, dst_path=str(tmp)))
    if pickles := sorted(p.name for p in local.rglob("*") if p.suffix in PICKLE_SUFFIXES):
        shutil.rmtree(tmp)
        raise ChampionError(f"the champion's weights hold pickle files ({', '.join(pickles)}); safetensors only")
    (tmp / ".done").write_text(folder)
    try:
        os.rename(tmp, dest)
    except OSError:  # another run downloaded it first
        shutil.rmtree(tmp, ignore_errors=True)


def frozen_items(champ: Champion, rebaseline: bool) -> list[dict]:
    """The test items the champion was judged on; an error when they are not recorded (unless re-baselining)."""
    path = champ.frozen / "test.jsonl" if champ.frozen else None
    if path is not None and path.is_file():
        return list(read_jsonl(path))
    if rebaseline:
        return []
    raise ChampionError(f"champion v{champ.version} of `{champ.name}` has no recorded evaluation set "
                        f"({path or 'no history recorded at registration'}): a comparison would not be on the items "
                        f"it was judged on. Restore it, or re-baseline on this run's test split with {REBASELINE}")


def evaluation_set(test_path: str, frozen: list[dict], out: Path) -> str:
    """This data's test split plus the champion's frozen items it no longer holds (one file, test items first)."""
    test = list(read_jsonl(Path(test_path)))
    have = {content_key(r) for r in test}
    extra = [{**r, "meta": {**r.get("meta", {}), "frozen": True}} for r in frozen if content_key(r) not in have]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "heldout_items.jsonl", test + extra)
    return str(out / "heldout_items.jsonl")


def check_cached(champ: Champion, frozen: list[dict], cfg: PipelineConfig, chat_tokenizer: str, work: Path) -> dict:
    """Where the champion's results on its frozen items must come from the caches: counts, or an error naming what
    is missing and how to re-baseline."""
    key = item_cache.model_key(champ.spec, cfg.eval.heldout, cfg.template.system_prompt, chat_tokenizer)
    rows = item_cache.read(key) if key else {}
    held_missing = sum(item_cache.item_key(r) not in rows for r in frozen)
    tasks = sweep_tasks(cfg.eval, work / "tasks")
    bench_missing = [t.name for t in tasks
                     if (k := lmeval.result_key(champ.spec, t, cfg.eval)) is None or cache.lookup("benchmarks", k) is None]
    if (held_missing or bench_missing) and not cfg.gate.vs_champion.rebaseline:
        what = [f"held-out results on {held_missing} of its {len(frozen)} frozen test items"] if held_missing else []
        what += [f"benchmark results on {len(bench_missing)} of {len(tasks)} tasks ({', '.join(bench_missing[:5])})"
                 f"{_changed_benchmarks(champ, tasks)}"] if bench_missing else []
        raise ChampionError(
            f"champion v{champ.version} of `{champ.name}`: the caches hold no {' and no '.join(what)} under this "
            f"run's settings (eval, template.system_prompt, the chat template and library versions decide them; "
            f"a damaged cache entry counts as missing). Re-baseline — evaluate the champion again on the same "
            f"items — with {REBASELINE}")
    return {"frozen_items": len(frozen), "heldout_to_evaluate": held_missing, "benchmark_tasks_to_evaluate":
            len(bench_missing)}


def _changed_benchmarks(champ: Champion, tasks: list) -> str:
    """Why benchmark results can be missing: the items differ from those it was judged on (other eval settings,
    changed benchmark data)."""
    judged = history.benchmark_tasks(champ.frozen) if champ.frozen else None
    if judged is None:
        return ""
    names = {t.name for t in tasks}
    changed = sorted({t.name for t in tasks if judged.get(t.name) != t.fingerprint} | (judged.keys() - names))
    return (f"; this run's benchmark items differ from those v{champ.version} was judged on in {len(changed)} "
            f"tasks ({', '.join(changed[:5])})" if changed else "")
