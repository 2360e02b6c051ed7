import json

import pytest
import yaml

from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import read_jsonl
from sftflow.tasks.benchmarks import benchmarks, build_mirror, stock_tasks_dir


def test_mmlu_mirror_converts_csv_and_includes_the_stock_yaml(tmp_path, data_root):
    names = build_mirror("mmlu", BenchmarkConfig(subtasks=["anatomy"], limit=3, num_fewshot=5), data_root, 1, tmp_path)
    assert names == ["sftflow_mmlu_anatomy"]
    spec = yaml.safe_load((tmp_path / "mmlu" / "sftflow_mmlu_anatomy.yaml").read_text())
    assert spec["include"] == str(stock_tasks_dir() / "mmlu/default/mmlu_anatomy.yaml")
    test = list(read_jsonl(tmp_path / "mmlu" / "anatomy.test.jsonl"))
    dev = list(read_jsonl(tmp_path / "mmlu" / "anatomy.dev.jsonl"))
    assert len(test) == 3 and len(dev) == 5  # dev whole and in order: first_n takes the shots
    assert set(test[0]) == {"question", "subject", "choices", "answer"} and 0 <= test[0]["answer"] <= 3
    again = tmp_path / "again"
    build_mirror("mmlu", BenchmarkConfig(subtasks=["anatomy"], limit=3, num_fewshot=5), data_root, 1, again)
    assert list(read_jsonl(again / "mmlu" / "anatomy.test.jsonl")) == test  # seeded sample


def test_unknown_subtask_is_named(tmp_path, data_root):
    with pytest.raises(ValueError, match="eval.bbh.subtasks: unknown \\['nope'\\]"):
        build_mirror("bbh", BenchmarkConfig(subtasks=["nope"], num_fewshot=3), data_root, 0, tmp_path)


def test_real_lm_eval_sweep_on_tiny_model(tmp_path, data_root, tiny_model):
    cfg = EvalConfig(mmlu=BenchmarkConfig(subtasks=["anatomy", "virology"], limit=2, num_fewshot=1),
                     bbh=BenchmarkConfig(subtasks=["navigate"], limit=3, num_fewshot=3), batch_size=4)
    out = benchmarks({"base": {"path": tiny_model}, "ft": {"path": tiny_model}}, cfg, str(data_root), tmp_path)
    m = out["metrics"]
    assert m["eval/base/mmlu/n"] == 4 and m["eval/base/bbh/n"] == 3
    assert m["forgetting/mmlu/delta"] == 0.0 and m["forgetting/bbh/delta"] == 0.0  # same model both sides
    items = list(read_jsonl(tmp_path / "items_base.jsonl"))
    assert {(i["benchmark"], i["task"]) for i in items} == {("mmlu", "anatomy"), ("mmlu", "virology"), ("bbh", "navigate")}
    assert json.loads((tmp_path / "benchmarks.json").read_text()) == m


def test_bbh_mirror_keeps_stock_prompts_and_scores_the_stripped_generation(tmp_path, data_root):
    build_mirror("bbh", BenchmarkConfig(subtasks=["navigate"], limit=2, num_fewshot=3), data_root, 0, tmp_path)
    spec = yaml.safe_load((tmp_path / "bbh" / "sftflow_bbh_navigate.yaml").read_text())
    assert spec["include"] == str(stock_tasks_dir() / "bbh/fewshot/navigate.yaml")
    assert not {"doc_to_text", "doc_to_target", "fewshot_config", "description"} & set(spec)  # stock prompts
    steps = [f["function"] for f in spec["filter_list"][0]["filter"]]
    assert steps == ["remove_whitespace", "take_first"]  # " True" must match "True" (lm-eval PR #2502)
