import csv
import json

import pytest
import yaml

from sftflow.configs.schema import BenchmarkConfig, EvalConfig
from sftflow.records import read_jsonl
from sftflow.tasks.evaluation.benchmarks import benchmarks
from sftflow.tasks.evaluation.mirror import build_mirror
from sftflow.tasks.evaluation.catalog import stock_tasks_dir


def test_mmlu_mirror_converts_csv_and_includes_the_stock_yaml(tmp_path, data_root):
    tasks = build_mirror("mmlu", BenchmarkConfig(subtasks=["anatomy"], limit=3, num_fewshot=5), data_root, 1, tmp_path)
    assert [t.name for t in tasks] == ["sftflow_mmlu_anatomy"] and tasks[0].category == "mmlu_stem"
    spec = yaml.safe_load((tmp_path / "mmlu" / "sftflow_mmlu_anatomy.yaml").read_text())
    assert spec["include"] == str(stock_tasks_dir() / "mmlu/default/mmlu_anatomy.yaml")
    test = list(read_jsonl(tmp_path / "mmlu" / "anatomy.test.jsonl"))
    dev = list(read_jsonl(tmp_path / "mmlu" / "anatomy.dev.jsonl"))
    assert len(test) == 3 and len(dev) == 5  # dev whole and in order: first_n takes the shots
    with (data_root / "mmlu/dev/anatomy_dev.csv").open(newline="") as fh:
        q, a, b, c, d, ans = next(csv.reader(fh))
    assert dev[0] == {"question": q, "subject": "anatomy", "choices": [a, b, c, d], "answer": "ABCD".index(ans)}
    again = build_mirror("mmlu", BenchmarkConfig(subtasks=["anatomy"], limit=3, num_fewshot=5), data_root, 1,
                         tmp_path / "again")
    assert list(read_jsonl(tmp_path / "again" / "mmlu" / "anatomy.test.jsonl")) == test  # seeded sample
    assert again[0].fingerprint == tasks[0].fingerprint  # content-addressed: the folder does not matter
    other = build_mirror("mmlu", BenchmarkConfig(subtasks=["anatomy"], limit=3, num_fewshot=5), data_root, 2,
                         tmp_path / "other")
    assert other[0].fingerprint != tasks[0].fingerprint  # another sample is another task


def test_mmlu_categories_come_from_lm_eval_groups(tmp_path, data_root):
    tasks = build_mirror("mmlu", BenchmarkConfig(limit=1, num_fewshot=0), data_root, 0, tmp_path)
    cats = {t.subtask: t.category for t in tasks}
    assert len(cats) == 57 and set(cats.values()) == {"mmlu_stem", "mmlu_humanities", "mmlu_social_sciences",
                                                      "mmlu_other"}
    assert cats["high_school_physics"] == "mmlu_stem" and cats["philosophy"] == "mmlu_humanities"
    assert cats["econometrics"] == "mmlu_social_sciences" and cats["virology"] == "mmlu_other"
    bbh = build_mirror("bbh", BenchmarkConfig(subtasks=["navigate"], limit=1, num_fewshot=3), data_root, 0, tmp_path)
    assert bbh[0].category is None  # BBH has no categories in lm-eval


def test_unknown_subtask_is_named(tmp_path, data_root):
    with pytest.raises(ValueError, match="eval.bbh.subtasks: unknown \\['nope'\\]"):
        build_mirror("bbh", BenchmarkConfig(subtasks=["nope"], num_fewshot=3), data_root, 0, tmp_path)


def test_bbh_mirror_keeps_stock_prompts_and_scores_the_stripped_generation(tmp_path, data_root):
    build_mirror("bbh", BenchmarkConfig(subtasks=["navigate"], limit=2, num_fewshot=3), data_root, 0, tmp_path)
    spec = yaml.safe_load((tmp_path / "bbh" / "sftflow_bbh_navigate.yaml").read_text())
    assert spec["include"] == str(stock_tasks_dir() / "bbh/fewshot/navigate.yaml")
    assert not {"doc_to_text", "doc_to_target", "fewshot_config", "description"} & set(spec)  # stock prompts
    steps = [f["function"] for f in spec["filter_list"][0]["filter"]]
    assert steps == ["remove_whitespace", "take_first"]  # " True" must match "True" (lm-eval PR #2502)


def test_real_lm_eval_sweep_on_tiny_model(tmp_path, data_root, tiny_model):
    cfg = EvalConfig(benchmark_root=str(data_root),
                     mmlu=BenchmarkConfig(subtasks=["anatomy", "virology"], limit=2, num_fewshot=1),
                     bbh=BenchmarkConfig(subtasks=["navigate"], limit=2, num_fewshot=3), batch_size=4,
                     bootstrap_iters=200)
    out = benchmarks({"base": {"path": tiny_model}, "ft": {"path": tiny_model}}, cfg, tmp_path)
    m = out["metrics"]
    assert m["eval/base/mmlu/n"] == 4 and m["eval/base/bbh/n"] == 2
    assert m["eval/base/mmlu_stem/acc"] == m["eval/base/mmlu/anatomy/acc"]  # anatomy is the only stem subject
    assert m["forgetting/mmlu/delta"] == 0.0 and m["forgetting/bbh/delta"] == 0.0  # same model both sides
    assert m["forgetting/mmlu/p_value"] == 1.0 and m["forgetting/mmlu/significant_drop"] == 0.0
    assert m["eval/base/evaluated_tasks"] == 3 and m["eval/base/cached_tasks"] == 0  # no digest: never cached
    items = list(read_jsonl(tmp_path / "items_base.jsonl"))
    assert {(i["benchmark"], i["task"]) for i in items} == {("mmlu", "anatomy"), ("mmlu", "virology"), ("bbh", "navigate")}
    assert json.loads((tmp_path / "benchmarks.json").read_text()) == m
    rows = json.loads((tmp_path / "forgetting.json").read_text())["ft"]
    assert {(r["scope"], r["name"]) for r in rows} == {
        ("benchmark", "mmlu"), ("benchmark", "bbh"), ("category", "mmlu_stem"), ("category", "mmlu_other"),
        ("subtask", "mmlu/anatomy"), ("subtask", "mmlu/virology"), ("subtask", "bbh/navigate")}
    assert (tmp_path / "forgetting_ft_subtasks.png").stat().st_size > 1000  # the subtasks apart from the totals
    assert (tmp_path / "forgetting_ft.png").stat().st_size > 1000 and "| benchmark | mmlu |" in \
        (tmp_path / "forgetting_ft.md").read_text()


def test_base_results_are_cached_across_runs(tmp_path, data_root, tiny_model, monkeypatch):
    from sftflow.models import resolve
    from sftflow.tasks.evaluation import lmeval as stage

    base = resolve(tiny_model, offline=True)
    models = {"base": {"path": base.path, "digest": base.digest}}
    # MMLU only: loglikelihood tasks keep this fast; BBH runs through the same code in the sweep test.
    cfg = EvalConfig(benchmark_root=str(data_root),
                     mmlu=BenchmarkConfig(subtasks=["anatomy", "virology"], limit=2, num_fewshot=1),
                     bbh=BenchmarkConfig(enabled=False, num_fewshot=3), batch_size=4, seed=987)
    first = benchmarks(models, cfg, tmp_path / "run1")["metrics"]
    assert first["eval/base/evaluated_tasks"] == 2 and first["eval/base/cached_tasks"] == 0

    def no_lm_eval(*args, **kwargs):
        raise AssertionError("lm-eval ran although every task was cached")

    with monkeypatch.context() as patch:
        patch.setattr(stage, "run_lm_eval", no_lm_eval)
        second = benchmarks(models, cfg, tmp_path / "run2")["metrics"]
    assert second["eval/base/cached_tasks"] == 2 and second["eval/base/wall_s"] == 0.0
    assert {k: v for k, v in second.items() if "_tasks" not in k and "wall_s" not in k} == \
        {k: v for k, v in first.items() if "_tasks" not in k and "wall_s" not in k}
    assert list(read_jsonl(tmp_path / "run2" / "items_base.jsonl")) == list(read_jsonl(tmp_path / "run1" / "items_base.jsonl"))

    # A new subtask is evaluated alone; a changed few-shot count is a different task.
    cfg.mmlu.subtasks = ["anatomy", "virology", "astronomy"]
    third = benchmarks(models, cfg, tmp_path / "run3")["metrics"]
    assert (third["eval/base/cached_tasks"], third["eval/base/evaluated_tasks"]) == (2, 1)
    cfg.mmlu.num_fewshot = 2
    fourth = benchmarks(models, cfg, tmp_path / "run4")["metrics"]
    assert (fourth["eval/base/cached_tasks"], fourth["eval/base/evaluated_tasks"]) == (0, 3)


def test_chat_template_option_renders_prompts_through_the_base_template(tmp_path, data_root, tiny_model):
    cfg = EvalConfig(benchmark_root=str(data_root),
                     mmlu=BenchmarkConfig(subtasks=["anatomy"], limit=1, num_fewshot=1),
                     bbh=BenchmarkConfig(enabled=False, num_fewshot=0), apply_chat_template=True, bootstrap_iters=50)
    models = {"base": {"path": tiny_model, "tokenizer": tiny_model}, "ft": {"path": tiny_model, "tokenizer": tiny_model}}
    benchmarks(models, cfg, tmp_path / "chat")
    [base], [ft] = (list(read_jsonl(tmp_path / "chat" / f"items_{t}.jsonl")) for t in ("base", "ft"))
    assert base["prompt"] == ft["prompt"] and base["prompt"].startswith("<|im_start|>system\nThe following are")
    assert base["prompt"].endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")  # few-shot as turns, then ask
    cfg.apply_chat_template = False
    benchmarks({"base": models["base"]}, cfg, tmp_path / "plain")
    [plain] = read_jsonl(tmp_path / "plain" / "items_base.jsonl")
    assert "<|im_start|>" not in plain["prompt"] and plain["prompt"].endswith("Answer:")


@pytest.mark.slow
def test_stock_task_names_run_alone_and_expand_groups_and_tags(tmp_path, data_root, tiny_model):
    """eval.tasks takes any lm-eval name. Stock data needs the hub, so this resolves a tag offline through the
    same path: lm-eval's full task index plus the mirror folder, where `sftflow_mmlu` tags the MMLU mirrors."""
    cfg = EvalConfig(benchmark_root=str(data_root),
                     mmlu=BenchmarkConfig(subtasks=["anatomy", "virology"], limit=2, num_fewshot=1),
                     bbh=BenchmarkConfig(enabled=False, num_fewshot=0),
                     tasks=["sftflow_mmlu"], tasks_limit=1, bootstrap_iters=50)
    out = benchmarks({"base": {"path": tiny_model}}, cfg, tmp_path)["metrics"]
    items = list(read_jsonl(tmp_path / "items_base.jsonl"))
    stock = [i for i in items if i["benchmark"] == "sftflow_mmlu"]
    assert sorted(i["task"] for i in stock) == ["sftflow_mmlu_anatomy", "sftflow_mmlu_virology"]  # tasks_limit=1
    assert out["eval/base/sftflow_mmlu/n"] == 2 and out["eval/base/mmlu/n"] == 4 and out["eval/base/evaluated_tasks"] == 3
    assert "eval/base/sftflow_mmlu/sftflow_mmlu_virology/acc" in out


def test_bbh_mirror_stops_at_the_stock_sequences_within_the_configured_budget(tmp_path, data_root):
    from lm_eval.tasks import TaskManager

    cfg = BenchmarkConfig(subtasks=["navigate"], limit=2, num_fewshot=3, max_gen_toks=48)
    budgeted = build_mirror("bbh", cfg, data_root, 0, tmp_path)
    spec = yaml.safe_load((tmp_path / "bbh" / "sftflow_bbh_navigate.yaml").read_text())
    assert spec["generation_kwargs"] == {"until": ["</s>", "Q", "\n\n"], "do_sample": False, "temperature": 0.0,
                                         "max_gen_toks": 48}
    # lm-eval reads it back as the task's generation settings (include + override)
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["sftflow_bbh_navigate"])
    loaded = task["tasks"]["sftflow_bbh_navigate"].config.generation_kwargs
    assert loaded["max_gen_toks"] == 48 and loaded["until"] == ["</s>", "Q", "\n\n"]
    stock = build_mirror("bbh", BenchmarkConfig(subtasks=["navigate"], limit=2, num_fewshot=3), data_root, 0,
                         tmp_path / "stock")
    assert "generation_kwargs" not in yaml.safe_load((tmp_path / "stock/bbh/sftflow_bbh_navigate.yaml").read_text())
    assert stock[0].fingerprint != budgeted[0].fingerprint  # another budget, other cached results


def test_a_generation_budget_on_mmlu_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="mmlu.max_gen_toks: MMLU scores its choices by likelihood"):
        EvalConfig(mmlu=BenchmarkConfig(num_fewshot=0, max_gen_toks=8))


def test_mde_picks_the_smallest_per_subtask_limit_that_reaches_it(tmp_path, data_root):
    from sftflow import stats
    from sftflow.tasks.evaluation.mirror import limit_for_mde

    need = stats.items_for_mde(0.1, 0.1)  # 149 items at discordance 0.1
    assert limit_for_mde([100, 100], 0.1, 0.1) == -(-need // 2)
    assert limit_for_mde([10, 1000], 0.1, 0.1) == need - 10  # the small subtask gives all it has
    assert limit_for_mde([10, 10], 0.1, 0.1) is None  # not reachable: every item
    cfg = BenchmarkConfig(subtasks=["anatomy", "virology", "astronomy"], num_fewshot=0, mde=0.2,
                          assumed_discordance=0.15)
    build_mirror("mmlu", cfg, data_root, 0, tmp_path)
    per_subject = [len(list(read_jsonl(tmp_path / "mmlu" / f"{s}.test.jsonl"))) for s in cfg.subtasks]
    assert len(set(per_subject)) == 1  # every subject has more than the chosen limit
    items = sum(per_subject)
    assert stats.paired_mde(items, 0.15) <= 0.2 < stats.paired_mde(items - len(per_subject), 0.15)
