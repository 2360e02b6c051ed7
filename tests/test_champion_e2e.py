"""A model name's life through the real flow, on a task whose scores the tiny model reaches in a few dozen steps
(a constant answer: its accuracy is that label's share of the items):

- v1 learns to answer "positive" (3 of 4 labels) and becomes champion, judged against the base only;
- v2 is trained on the negative records only (the others are filtered out): it answers "negative", beats the
  base and loses to the champion on v1's frozen test items (those it dropped are evaluated all the same), whose
  champion results come from the cache; it stays challenger with a reason naming v1;
- v3 is trained on more data and does at least as well as v1 on v1's items plus its own new slice: it replaces v1.

`sftflow history` lists all three; a champion whose recorded evaluation set is gone stops a run before training."""
import json
import random
import shutil

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sftflow import history
from sftflow.configs.loader import load_config
from sftflow.flows.retrain import register
from sftflow.release import registry
from sftflow.release.champion import ChampionError
from sftflow.release.lineage import versions

pytestmark = pytest.mark.e2e
NAME = "champion-e2e"
WORDS = "good bad film plot actor scene story music long short fun dull great poor".split()


def reviews(path, n: int, seed: int, start: int = 0) -> None:
    """Three of four records positive."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(start, start + n):
            label = "positive" if i % 4 else "negative"
            text = " ".join(rng.choice(WORDS) for _ in range(12)) + f" #{i}"
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Answer {label}. Review: {text}"},
                                             {"role": "assistant", "content": label}], "label": label}) + "\n")


def run(data_root, tmp_path, steps: int, sources: list[str], **extra):
    from sftflow.flows.sft_pipeline import sft_pipeline

    overrides = [f"name={NAME}", f"data.root={tmp_path}", f"eval.benchmark_root={data_root}",
                 "data.sources=[" + ", ".join(f"{{path: {s}}}" for s in sources) + "]",
                 "train.method=full", "train.learning_rate=1e-2", f"train.max_steps={steps}",
                 "curate.near_dedup.enabled=false", "gate.max_forgetting={mmlu: 1.0, bbh: 1.0}",
                 *(f"{k}={v}" for k, v in extra.items())]
    cfg = load_config(None, overrides, base=json.loads(json.dumps(SMOKE)))
    result = sft_pipeline(config=cfg)
    return cfg, result, register(cfg, result)


SMOKE: dict = {}


@pytest.fixture(scope="module")
def life(prefect_server, data_root, tmp_path_factory):
    import yaml

    from conftest import REPO

    SMOKE.update(yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text()))
    tmp = tmp_path_factory.mktemp("champion")
    reviews(tmp / "reviews.jsonl", 120, seed=0)
    reviews(tmp / "more.jsonl", 60, seed=1, start=1000)
    out = {"tmp": tmp}
    out["v1"] = run(data_root, tmp, 40, ["reviews.jsonl"])
    out["champion_after"] = [registry.champion(NAME).version]
    out["v2"] = run(data_root, tmp, 40, ["reviews.jsonl"], **{"curate.allowed_labels": "[negative]"})
    out["champion_after"].append(registry.champion(NAME).version)
    out["v3"] = run(data_root, tmp, 40, ["reviews.jsonl", "more.jsonl"])
    return out


def test_v1_becomes_champion_judged_against_the_base_only(life):
    _, result, v1 = life["v1"]
    assert result["gate"]["passed"] and result["gate"]["champion"] is None
    assert int(v1.version) == 1 and int(life["champion_after"][0]) == 1
    assert v1.tags["sftflow.judged_against"] == "base"
    recorded = history.versions(NAME)[0]
    assert recorded.version == 1 and recorded.counts["test"] > 0 and (recorded.path / "test.jsonl").is_file()
    # the frozen set, held-out items and benchmark tasks by content, is logged as datasets of the version's run
    swept = json.loads((recorded.path / "benchmarks.json").read_text())
    assert len(swept) == 4 and all(t["fingerprint"] and t["items"] == 2 for t in swept)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): json.loads(i.dataset.profile)
              for i in MlflowClient().get_run(v1.run_id).inputs.dataset_inputs}
    assert inputs["frozen_eval"]["num_rows"] == recorded.counts["test"]
    assert inputs["frozen_benchmarks"]["num_rows"] == 4


def test_a_weaker_candidate_that_beats_the_base_stays_challenger_naming_the_champion(life):
    _, r1, _ = life["v1"]
    _, result, v2 = life["v2"]
    m = MlflowClient().get_run(result["mlflow_run_id"]).data.metrics
    assert m["heldout/delta/label_acc"] >= 0.05  # it beats the base
    assert m["champion/delta/label_acc"] < 0 and "champion/delta/label_acc/ci_low" in m
    reasons = result["gate"]["reasons"]
    failed = [c for c in reasons if c.startswith("vs champion v1: held-out label_acc")]
    assert failed and "<" in failed[0], reasons
    assert not result["gate"]["passed"] and int(life["champion_after"][1]) == 1
    assert v2.aliases == ["challenger"] and v2.tags["sftflow.judged_against"] == "v1"
    # judged on exactly v1's test items (the positives it filtered out included), whose champion results came
    # from the cache: nothing of the champion was generated or swept again
    v1_metrics = MlflowClient().get_run(r1["mlflow_run_id"]).data.metrics
    assert m["heldout/records"] == v1_metrics["split/test"] > m["split/test"]
    assert m["heldout/champion/evaluated_items"] == 0 and m["heldout/champion/cached_items"] == m["heldout/records"]
    # what it was judged on is what its history keeps as its frozen set, for whoever faces it later
    v2_frozen = history.versions(NAME)[1].path / "test.jsonl"
    assert len(v2_frozen.read_text().splitlines()) == m["heldout/records"]
    assert m["eval/champion/evaluated_tasks"] == 0 and m["eval/champion/cached_tasks"] > 0
    assert m["heldout/champion/label_acc"] == MlflowClient().get_run(r1["mlflow_run_id"]).data.metrics[
        "heldout/ft/label_acc"]
    # what it kept of the same data keeps its split and is reported as seen
    assert m["split/seen"] == m["curate/kept"] and m["split/new"] == 0
    from sftflow.stage_summary import stage_summary

    line = stage_summary("split", {k: v for k, v in m.items() if k.startswith("split/")})
    assert f"earlier versions: 0 new, {m['split/seen']:.0f} seen, 0 near duplicates of seen, 0 bridges" in line
    assert f"vs champion {m['champion/delta/label_acc']:+.3f}" in stage_summary("heldout", m)
    # the summary shows base / champion / candidate side by side
    row = next(r for r in result["rows"] if r["measure"] == "held-out label_acc")
    assert row["champion"] == m["heldout/champion/label_acc"] and row["vs_champion"] == m["champion/delta/label_acc"]


def test_a_candidate_at_least_as_good_replaces_the_champion_judged_on_its_frozen_items_and_the_new_slice(life):
    _, r1, _ = life["v1"]
    _, result, v3 = life["v3"]
    m = MlflowClient().get_run(result["mlflow_run_id"]).data.metrics
    assert result["gate"]["passed"], result["gate"]["reasons"]
    assert any(r.startswith("vs champion v1: held-out label_acc") and ">=" in r for r in result["gate"]["reasons"])
    assert int(registry.champion(NAME).version) == int(v3.version) == 3
    assert v3.tags["sftflow.previous_champion"] == "1"
    v1_test = MlflowClient().get_run(r1["mlflow_run_id"]).data.metrics["split/test"]
    assert m["split/seen"] > 0 and m["split/new"] > 0  # the new source's records are new
    # evaluated on v1's test items (results cached) plus this data's new test slice (the champion generated it)
    assert m["heldout/records"] > v1_test
    assert m["heldout/champion/cached_items"] == v1_test
    assert m["heldout/champion/evaluated_items"] == m["heldout/records"] - v1_test


def test_history_lists_every_version_with_its_verdict_and_data(life):
    rows = versions(NAME)
    assert [(r["version"], r["role"], r["judged_against"], r["gate"]) for r in rows] == [
        (1, "", "base", True), (2, "", "v1", False), (3, "champion", "v1", True)]
    assert rows[1]["failed"] and rows[1]["data"]["seen"] > 0 and rows[2]["data"]["new"] > 0
    from sftflow.cli.app import app

    out = CliRunner().invoke(app, ["history", NAME], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "champion" in out.output and "vs champion v1" in out.output


def test_a_champion_without_its_recorded_evaluation_set_stops_the_run_before_training(life, data_root):
    champ = history.folder(NAME) / "v3"
    moved = champ.with_name("moved-v3")
    shutil.move(champ, moved)
    try:
        with pytest.raises(ChampionError, match=r"champion v3 .* no recorded evaluation set.*rebaseline=true"):
            run(data_root, life["tmp"], 2, ["reviews.jsonl"])
    finally:
        shutil.move(moved, champ)


def test_other_benchmark_items_than_the_champion_was_judged_on_stop_the_run_naming_them(life, data_root):
    with pytest.raises(ChampionError, match=r"champion v3 .* benchmark results on 2 of 4 tasks .* differ from those "
                                            r"v3 was judged on in 2 tasks .*rebaseline=true"):
        run(data_root, life["tmp"], 2, ["reviews.jsonl", "more.jsonl"], **{"eval.mmlu.num_fewshot": "4"})


def test_missing_champion_results_stop_the_run_until_it_is_rebaselined(life, data_root):
    from sftflow import env

    shutil.rmtree(env.state_dir() / "cache" / "heldout-items")  # a cleaned cache: the champion's items are gone
    with pytest.raises(ChampionError, match=r"champion v3 .* held-out results on \d+ of its \d+ frozen test items"
                                            r".*rebaseline=true"):
        run(data_root, life["tmp"], 2, ["reviews.jsonl", "more.jsonl"])
    _, result, version = run(data_root, life["tmp"], 2, ["reviews.jsonl", "more.jsonl"],
                             **{"gate.vs_champion.rebaseline": "true"})
    m = MlflowClient().get_run(result["mlflow_run_id"]).data.metrics
    assert m["heldout/champion/evaluated_items"] == m["heldout/records"] and m["heldout/champion/cached_items"] == 0
    assert "vs champion v3" in " ".join(result["gate"]["reasons"]) and version.tags["sftflow.judged_against"] == "v3"
