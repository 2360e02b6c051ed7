"""The data stage on a planted set: real SuperNI reviews plus known duplicates, leaks and bad rows."""

import json

import pytest

from sftflow.configs.schema import CurateConfig, DataConfig, Source, SplitConfig
from sftflow.records import read_jsonl
from sftflow.tasks.data.curate import curate
from sftflow.tasks.data.load import load
from sftflow.tasks.data.split import SPLITS, split
from sftflow.tasks.evaluation.catalog import BENCHMARKS

TASK = "natural-instructions/tasks/task1312_amazonreview_polarity_classification.json"
BENCH = {"mmlu": ["anatomy"], "bbh": ["navigate"]}


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def planted(tmp_path, data_root):
    reviews = list(read_jsonl(load(DataConfig(root=str(data_root), sources=[Source(path=TASK, max_records=120, name="amazon")]),
                                   tmp_path / "peek")["records"]))
    long = next(r for r in reviews if len(r["messages"][0]["content"].split()) > 120)
    near = long["messages"][0]["content"].replace(" the ", " a ", 1)
    q = BENCHMARKS["mmlu"].rows(data_root / "mmlu", "anatomy", "test")[11]
    nav = BENCHMARKS["bbh"].rows(data_root / "bbh", "navigate", "test")[5]
    rows = [
        chat(reviews[0]["messages"][0]["content"].upper(), reviews[0]["messages"][1]["content"]),  # exact dup
        chat(near, long["messages"][1]["content"]),  # near dup
        chat(f"{q['question']} Options: {', '.join(q['choices'])}", "B"),  # MMLU leak
        chat(f"Think step by step. {nav['input']}", nav["target"]),  # BBH leak
        chat("Summarise the plot of the film in one line please.", "As an AI language model, I cannot watch films."),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                      {"role": "assistant", "content": "b"}]},  # role order
        {"text": "not a record"},  # unreadable
    ]
    (tmp_path / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(root=str(data_root), sources=[Source(path=TASK, max_records=120, name="amazon"),
                                                    Source(path=str(tmp_path / "planted.jsonl"), name="planted")])
    return data, long


def run_stage(data, out, tokenizer, curate_cfg=None, split_cfg=None):
    loaded = load(data, out / "load", curate_cfg)
    curated = curate(loaded["records"], curate_cfg or CurateConfig(), out / "curate", tokenizer=tokenizer,
                     load_rejects=loaded["rejects"])
    return loaded, curated, split(curated["records"], split_cfg or SplitConfig(), out / "split",
                                  upstream={"load": loaded["ledger"], "curate": curated["ledger"]},
                                  benchmarks=BENCH, benchmark_root=data.root)


def planted_id(out, line):
    return next(r["id"] for r in read_jsonl(out / "load" / "records.jsonl")
                if r["source"] == "planted" and r["index"] == line)


def test_every_planted_problem_is_caught_and_the_ledger_adds_up(planted, tmp_path, tiny_model):
    data, long = planted
    out = tmp_path / "run"
    loaded, curated, splits = run_stage(data, out, tiny_model)
    reasons = {r["id"]: r["reason"] for r in read_jsonl(out / "curate" / "curate_rejects.jsonl")}
    original = next(read_jsonl(out / "load" / "records.jsonl"))  # the same seeded sample as `planted` saw
    assert {reasons.get(planted_id(out, 1)), reasons.get(original["id"])} == {"exact_duplicate", None}
    assert {reasons.get(planted_id(out, 2)), reasons.get(long["id"])} == {"near_duplicate", None}
    assert reasons[planted_id(out, 5)] == "boilerplate"
    assert reasons[planted_id(out, 6)] == "preflight:consecutive_assistant_turns"
    assert len(reasons) == 4
    contaminated = {r["id"]: r for r in read_jsonl(out / "split" / "decontam_rejects.jsonl")}
    assert set(contaminated) == {planted_id(out, 3), planted_id(out, 4)}  # nothing else: SuperNI is clean
    assert contaminated[planted_id(out, 3)]["record"]["meta"]["contaminated_by"]["item"] == "mmlu/anatomy/test/11"
    assert contaminated[planted_id(out, 4)]["record"]["meta"]["contaminated_by"]["item"] == "bbh/navigate/test/5"
    ledger = json.loads((out / "split" / "curation_report.json").read_text())["accounting"]
    assert ledger == {"records_in": 127, "kept": 120, "rejected": 3, "exact_dup": 1, "near_dup": 1, "contaminated": 2,
                      "bridged": 0}
    assert sum(splits["metrics"][f"split/{s}"] for s in SPLITS) == 120
    md = (out / "split" / "curation_report.md").read_text()
    assert "127** records in" in md and "mmlu/anatomy/test/11" in md and "exact_duplicate" in md


def test_kept_near_duplicate_clusters_stay_in_one_split(planted, tmp_path):
    data, long = planted
    out = tmp_path / "keep"
    cfg = CurateConfig(near_dedup={"remove": False})
    for seed in range(4):
        _, curated, splits = run_stage(data, out / str(seed), None, cfg, SplitConfig(seed=seed, test_ratio=0.3))
        assert curated["counts"]["near_dup"] == 0 and curated["ledger"]["near_dedup"]["clusters"] >= 1
        where = {r["id"]: s for s in SPLITS for r in read_jsonl(splits["paths"][s])}
        cluster = [r["id"] for r in read_jsonl(curated["records"]) if r["meta"].get("near_dup_cluster")]
        assert len(cluster) >= 2 and len({where[i] for i in cluster}) == 1


def test_unchanged_rerun_is_a_cache_hit_for_the_whole_stage(planted, tmp_path):
    data, _ = planted
    first = run_stage(data, tmp_path / "a", None)
    second = run_stage(data, tmp_path / "b", None)
    for result, stage in zip(second, ("load", "curate", "split")):
        assert result["metrics"][f"{stage}/cache_hit"] == 1
    assert first[2]["digests"] == second[2]["digests"]
    assert (tmp_path / "b" / "split" / "train.jsonl").read_bytes() == (tmp_path / "a" / "split" / "train.jsonl").read_bytes()


def test_empty_train_split_names_the_rule_that_removed_the_data(tmp_path, data_root):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(chat(f"Question {i}: what now?", f"Answer {i} in words."))
                                                 + "\n" for i in range(30)))
    data = DataConfig(root=str(data_root), sources=[Source(path=str(tmp_path / "chat.jsonl"))])
    with pytest.raises(ValueError) as info:
        run_stage(data, tmp_path / "run", None, CurateConfig(allowed_labels=["yes", "no"]))
    msg = str(info.value)
    assert msg.startswith("the train split is empty (0 records after curation): add data; rule label_not_allowed "
                          "removed 30 of 30 records (see curate.allowed_labels")
    assert "chat.jsonl:1: user: 'Question 0: what now?' -> assistant: 'Answer 0 in words.'" in msg
