"""The benchmark registry: one entry per benchmark holds everything about it. Where its originals live under
eval.benchmark_root and which files each subtask needs, how its rows are read (the mirror's data), which stock
lm-eval YAML its mirror includes and what scoring it adds, and which text of a row decontamination indexes.

Light on purpose (no lm-eval, Prefect or torch import): the config check runs it before any work starts,
and both the eval mirrors (mirror.py) and decontamination (decontam.py) read through it, so they can
never look in different places. "all" means every subtask lm-eval ships a stock YAML for: a generated
mirror task includes that YAML, so it is the set the eval can run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sftflow.errors import UserError

SETTING = "eval.benchmark_root"


class MissingBenchmarkError(UserError, FileNotFoundError):
    """Benchmark files the run needs are not under eval.benchmark_root."""


def stock_tasks_dir() -> Path:
    """lm-eval's bundled task folder, found without importing lm-eval (indexing it costs seconds)."""
    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def _mmlu_file(src: Path, subject: str, split: str) -> Path:
    return src / split / f"{subject}_{split}.csv"


def _mmlu_rows(src: Path, subject: str, split: str) -> list[dict]:
    with _mmlu_file(src, subject, split).open(encoding="utf-8", newline="") as fh:
        return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())}
                for q, a, b, c, d, ans in csv.reader(fh)]


def _bbh_file(src: Path, subtask: str, split: str) -> Path:
    return src / f"{subtask}.json"  # one file per subtask; its only split is test


def _bbh_rows(src: Path, subtask: str, split: str) -> list[dict]:
    return json.loads(_bbh_file(src, subtask, split).read_text(encoding="utf-8"))["examples"]


# What text of a row a model would see, so what a training record could have copied.
def _mmlu_texts(row: dict) -> list[str]:
    return [row["question"], " ".join(row["choices"])]


def _bbh_texts(row: dict) -> list[str]:
    return [row["input"]]


@dataclass(frozen=True)
class Benchmark:
    folder: str  # under eval.benchmark_root
    file: Callable[[Path, str, str], Path]  # (folder, subtask, split) -> the original file
    rows: Callable[[Path, str, str], list[dict]]  # (folder, subtask, split) -> the mirror's rows, in file order
    item_texts: Callable[[dict], list[str]]  # row -> the texts decontamination indexes
    stock_yaml: str  # under lm_eval/tasks, {sub} = subtask
    layout: str  # what a user must provide, for messages
    extra_splits: tuple[str, ...] = ()  # copied whole (few-shot source), in file order
    scoring: dict | None = None  # YAML keys added to the stock task; prompts are never touched

    def stock_subtasks(self) -> list[str]:
        pattern = Path(self.stock_yaml)
        prefix, suffix = pattern.name.split("{sub}")
        return sorted(p.name[len(prefix):len(p.name) - len(suffix)]
                      for p in (stock_tasks_dir() / pattern.parent).glob(pattern.name.replace("{sub}", "*"))
                      if not p.name.startswith("_"))

    def subtasks(self, chosen: list[str] | str) -> list[str]:
        return self.stock_subtasks() if chosen == "all" else list(chosen)

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split the eval reads: the scored test split and the few-shot sources."""
        return ("test", *self.extra_splits)

    def files(self, root: Path, subtask: str) -> list[Path]:
        return [self.file(root / self.folder, subtask, split) for split in self.splits]

    def items(self, root: Path, subtask: str, split: str) -> list[list[str]]:
        """The decontamination texts of every row of one split, in file order."""
        return [self.item_texts(row) for row in self.rows(root / self.folder, subtask, split)]


# Stock bbh_fewshot compares the raw generation, so " True" never matches "True" and most models score
# 0 (lm-evaluation-harness PR #2502). Score the stripped generation with lm-eval's own filter instead.
_STRIPPED = {"filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                          {"function": "take_first"}]}]}

BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark(folder="mmlu", file=_mmlu_file, rows=_mmlu_rows, item_texts=_mmlu_texts,
                      stock_yaml="mmlu/default/mmlu_{sub}.yaml",
                      layout="mmlu/test/<subject>_test.csv and mmlu/dev/<subject>_dev.csv (the original MMLU CSVs)",
                      extra_splits=("dev",)),
    "bbh": Benchmark(folder="bbh", file=_bbh_file, rows=_bbh_rows, item_texts=_bbh_texts,
                     stock_yaml="bbh/fewshot/{sub}.yaml", layout="bbh/<subtask>.json (the original BBH JSON)",
                     scoring=_STRIPPED),
}


def unknown_subtasks(name: str, chosen: list[str] | str) -> str | None:
    """A message naming the chosen subtasks lm-eval has no task for, or None."""
    bench = BENCHMARKS[name]
    available = bench.stock_subtasks()
    unknown = sorted(set(bench.subtasks(chosen)) - set(available))
    return f"eval.{name}.subtasks: unknown {unknown}; available: {', '.join(available)}" if unknown else None


def missing_files(root: Path, targets: dict[str, list[str] | str]) -> dict[str, list[Path]]:
    """{benchmark: files the evaluated subtasks need that are not under root}."""
    out = {}
    for name, chosen in targets.items():
        bench = BENCHMARKS[name]
        absent = [f for sub in bench.subtasks(chosen) for f in bench.files(root, sub) if not f.is_file()]
        if absent:
            out[name] = absent
    return out


def missing_message(root: Path, missing: dict[str, list[Path]], shown: int = 6) -> str:
    """Which files are missing and how to provide them."""
    lines = [f"{SETTING} = {root}: {sum(map(len, missing.values()))} benchmark file(s) the eval and "
             "decontamination need are missing:"]
    for name, files in missing.items():
        listed = ", ".join(str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files[:shown])
        more = f" and {len(files) - shown} more" if len(files) > shown else ""
        lines.append(f"  {name}: {listed}{more}; expected {BENCHMARKS[name].layout}")
    lines.append(f"Point {SETTING} at the folder holding them (config `eval: {{benchmark_root: PATH}}` or "
                 f"`--set {SETTING}=PATH`), choose subtasks that are there (eval.<benchmark>.subtasks), or turn a "
                 "benchmark off (eval.<benchmark>.enabled=false).")
    return "\n".join(lines)


def check(root: Path, targets: dict[str, list[str] | str]) -> None:
    """Raise MissingBenchmarkError unless every file of every evaluated subtask is under root."""
    if missing := missing_files(root, targets):
        raise MissingBenchmarkError(missing_message(root, missing))
