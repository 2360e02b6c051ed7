"""Benchmark originals live under eval.benchmark_root, apart from the user's training data (data.root): checked
when the config loads, read by both decontamination and the eval mirrors, and never silently empty."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_record

from sftflow.configs.loader import ConfigError, load_config
from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import write_jsonl
from sftflow.tasks.data.decontam import DecontamError, targets
from sftflow.tasks.data.split import split
from sftflow.tasks.evaluation.mirror import build_mirror
from sftflow.tasks.evaluation.catalog import BENCHMARKS, MissingBenchmarkError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs/smoke.yaml"


def user_data(folder: Path, data_root: Path) -> Path:
    """A user's own data folder: 30 reviews-like records and one pasted MMLU anatomy question."""
    q = BENCHMARKS["mmlu"].rows(data_root / "mmlu", "anatomy", "test")[7]
    rows = [make_record(i, f"Review number {i}: the product was {'great' if i % 2 else 'poor'} and I say so "
                           f"at length, word {i * 7}.", "positive" if i % 2 else "negative") for i in range(30)]
    rows.append(make_record(30, f"{q['question']} Options: {', '.join(q['choices'])}", "B"))
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "mine.jsonl", rows)
    return folder / "mine.jsonl"


def test_user_data_root_keeps_the_shared_benchmarks_and_decontamination_finds_the_leak(tmp_path, data_root):
    records = user_data(tmp_path / "mine", data_root)
    cfg = load_config(SMOKE, [f"data.root={tmp_path / 'mine'}", "data.sources=[{path: mine.jsonl}]"])
    assert cfg.data.root == str(tmp_path / "mine") and cfg.eval.benchmark_root == str(data_root.resolve())
    out = split(str(records), cfg.split, tmp_path / "split", benchmarks=targets(cfg.eval),
                benchmark_root=cfg.eval.benchmark_root)
    contamination = json.loads((tmp_path / "split" / "curation_report.json").read_text())["decontamination"]
    assert contamination["benchmark_items"] > 100  # anatomy + virology + 2 BBH subtasks, test and dev rows
    assert [m["id"] for m in contamination["matches"] if m["against"] == "benchmark"] == ["r0030"]
    assert out["metrics"]["split/contaminated"] >= 1


def test_a_partial_mirror_names_every_missing_file_and_how_to_fix_it(tmp_path, data_root):
    part = tmp_path / "bench"
    for split_name in ("test", "dev"):
        (part / "mmlu" / split_name).mkdir(parents=True)
        shutil.copy(data_root / f"mmlu/{split_name}/anatomy_{split_name}.csv", part / "mmlu" / split_name)
    (part / "bbh").mkdir()
    shutil.copy(data_root / "bbh/navigate.json", part / "bbh")
    ok = load_config(SMOKE, [f"eval.benchmark_root={part}", "eval.mmlu.subtasks=[anatomy]",
                             "eval.bbh.subtasks=[navigate]"])
    assert ok.eval.benchmark_root == str(part)
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [f"eval.benchmark_root={part}"])  # smoke also wants virology and boolean_expressions
    msg = str(err.value)
    assert "mmlu/test/virology_test.csv, mmlu/dev/virology_dev.csv" in msg and "bbh/boolean_expressions.json" in msg
    assert "anatomy" not in msg.split("missing:")[1].split("expected")[0]  # present files are not listed
    assert "--set eval.benchmark_root=PATH" in msg and "eval.<benchmark>.enabled=false" in msg
    with pytest.raises(ConfigError, match=" 112 benchmark file"):  # "all": lm-eval's 57 subjects, 56 absent here
        load_config(SMOKE, [f"eval.benchmark_root={part}", "eval.mmlu.subtasks=all", "eval.bbh.enabled=false"])
    # Turned off, a benchmark needs no files; nothing evaluated, nothing checked.
    load_config(SMOKE, [f"eval.benchmark_root={tmp_path / 'none'}", "eval.mmlu.enabled=false",
                        "eval.bbh.enabled=false"])


def test_unknown_subtasks_stop_at_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.mmlu.subtasks: unknown \['anatomyy'\]"):
        load_config(SMOKE, ["eval.mmlu.subtasks=[anatomyy]"])


def test_decontamination_that_indexes_nothing_is_an_error(tmp_path, data_root):
    empty = tmp_path / "bench"
    (empty / "bbh").mkdir(parents=True)
    (empty / "bbh" / "navigate.json").write_text(json.dumps({"examples": []}))  # present, but holds no item
    cfg = load_config(SMOKE, [f"eval.benchmark_root={empty}", "eval.mmlu.enabled=false",
                              "eval.bbh.subtasks=[navigate]"])
    records = user_data(tmp_path / "mine", data_root)
    with pytest.raises(DecontamError, match="indexed 0 benchmark items"):
        split(str(records), cfg.split, tmp_path / "split", benchmarks=targets(cfg.eval),
              benchmark_root=cfg.eval.benchmark_root)
    cfg.split.decontam.enabled = False  # said explicitly: then no benchmark check is wanted
    split(str(records), cfg.split, tmp_path / "split2", benchmarks=targets(cfg.eval),
          benchmark_root=cfg.eval.benchmark_root)


def test_the_eval_mirror_reads_the_benchmark_root_and_names_files_gone_since_the_check(tmp_path, data_root):
    root = tmp_path / "bench"
    shutil.copytree(data_root / "bbh", root / "bbh", ignore=shutil.ignore_patterns("cot-prompts"))
    cfg = EvalConfig(benchmark_root=str(root), bbh=BenchmarkConfig(subtasks=["navigate"], limit=2, num_fewshot=3))
    [task] = build_mirror("bbh", cfg.bbh, Path(cfg.benchmark_root), 0, tmp_path / "mirror")
    spec = (tmp_path / "mirror" / "bbh" / "sftflow_bbh_navigate.yaml").read_text()
    assert task.subtask == "navigate" and str(tmp_path / "mirror") in spec
    (root / "bbh" / "navigate.json").unlink()
    with pytest.raises(MissingBenchmarkError, match="bbh/navigate.json"):
        build_mirror("bbh", cfg.bbh, Path(cfg.benchmark_root), 0, tmp_path / "mirror2")
