"""The held-out stage caches each model's generations per record: a rerun, another model next to the same ones or
more test records generate only what no earlier run generated, and score as a run with nothing cached."""

import pytest
from conftest import make_record

from sftflow import cache, env
from sftflow.configs.schema import HeldoutConfig
from sftflow.models import load_tokenizer, model_digest
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.evaluation import heldout as stage
from sftflow.tasks.evaluation import item_cache

CFG = HeldoutConfig(max_new_tokens=4, batch_size=2, examples=3)
WORK = ("cached_items", "evaluated_items", "wall_s")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, dict]:
    """Three models whose greedy outputs differ from prompt to prompt and from each other."""
    import torch

    from sftflow.models import load_causal_lm

    out = {}
    for seed, tag in enumerate(("base", "ft", "other")):
        model = load_causal_lm(tiny_model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
        folder = tmp_path_factory.mktemp(tag)
        model.save_pretrained(folder)
        load_tokenizer(tiny_model).save_pretrained(folder)
        out[tag] = {"path": str(folder), "digest": model_digest(str(folder))}
    return out


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def reviews(n: int, start: int = 0) -> list[dict]:
    return [make_record(i, f"review {i}: {'great' if i % 3 else 'dull'} film " * (1 + i % 4), "POS" if i % 2 else "NEG",
                        label="POS" if i % 2 else "NEG") for i in range(start, start + n)]


def run(test, models, out, **kw):
    return stage.heldout(str(test), models, kw.pop("cfg", CFG), out_dir=out, bootstrap_iters=100, **kw)["metrics"]


def work(m: dict, tag: str) -> tuple:
    return m[f"heldout/{tag}/cached_items"], m[f"heldout/{tag}/evaluated_items"]


def scores(m: dict) -> dict:
    return {k: v for k, v in m.items() if k.rsplit("/", 1)[-1] not in (*WORK, "cache_hit")}


def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_a_rerun_generates_nothing_and_scores_the_same(tmp_path, state, models, monkeypatch):
    write_jsonl(tmp_path / "test.jsonl", reviews(6))
    pair = {"base": models["base"], "ft": models["ft"]}
    first = run(tmp_path / "test.jsonl", pair, tmp_path / "run1")
    assert work(first, "base") == work(first, "ft") == (0, 6) and first["heldout/cache_hit"] == 0
    monkeypatch.setattr(stage, "load_causal_lm", refuse)
    second = run(tmp_path / "test.jsonl", pair, tmp_path / "run2")
    assert work(second, "base") == work(second, "ft") == (6, 0) and second["heldout/cache_hit"] == 1
    assert second["heldout/ft/wall_s"] == 0.0 and scores(second) == scores(first)
    for name in ("predictions.jsonl", "examples.md"):
        assert (tmp_path / "run2" / name).read_text() == (tmp_path / "run1" / name).read_text()
    rows = list(read_jsonl(tmp_path / "run1" / "predictions.jsonl"))
    assert len({r["ft_prediction"] for r in rows}) > 1  # the models say different things to different prompts
    # Another stage reads one model's rows from the same cache, loading no model.
    ft = stage.model_predictions(tmp_path / "test.jsonl", models["ft"], CFG)
    assert [r["prediction"] for r in ft] == [r["ft_prediction"] for r in rows]
    assert sum(r["label_acc"] for r in ft) / 6 == first["heldout/ft/label_acc"] and ft[0]["id"] == rows[0]["id"]


def test_another_model_is_the_only_one_generated(tmp_path, state, models, monkeypatch):
    write_jsonl(tmp_path / "test.jsonl", reviews(5))
    run(tmp_path / "test.jsonl", {"base": models["base"], "ft": models["ft"]}, tmp_path / "run1")
    three = run(tmp_path / "test.jsonl", models, tmp_path / "run2")
    assert work(three, "base") == work(three, "ft") == (5, 0) and work(three, "other") == (0, 5)
    assert "heldout/delta/other/label_acc" in three and three["heldout/cache_hit"] == 0
    # A champion that is the fine-tuned model's content: read from the fine-tuned model's items.
    with monkeypatch.context() as patch:
        patch.setattr(stage, "load_causal_lm", refuse)
        four = run(tmp_path / "test.jsonl", {**models, "champion": dict(models["ft"])}, tmp_path / "run3")
    assert work(four, "champion") == (5, 0) and four["heldout/cache_hit"] == 1
    assert four["heldout/champion/label_acc"] == four["heldout/ft/label_acc"] == three["heldout/ft/label_acc"]
    # A model known only by its hub id is generated every time.
    hub = {"path": models["ft"]["path"], "digest": "hub:org/ft"}
    for _ in range(2):
        assert work(run(tmp_path / "test.jsonl", {"base": models["base"], "ft": hub}, tmp_path / "run4"),
                    "ft") == (0, 5)


def test_added_records_are_the_only_ones_generated_and_score_as_an_uncached_run(tmp_path, state, models, tiny_model,
                                                                               data_root, monkeypatch):
    from sftflow.configs.schema import Source
    from sftflow.tasks.data.load import load_source
    from sftflow.tasks.training.template import load_chat_template

    # Calculator conversations next to plain ones: the tool-call generations are cached per record too.
    tok = load_tokenizer(tiny_model)
    tok.chat_template = load_chat_template("trl:qwen3_instruct_2507_training")
    tok.save_pretrained(tmp_path / "tok")
    gsm8k = load_source(Source(path="gsm8k/train.jsonl", format="gsm8k_calculator", max_records=4), data_root)[0]
    records = reviews(3) + gsm8k[:2] + reviews(3, start=3) + gsm8k[2:]
    pair = {"base": models["base"], "ft": models["ft"]}
    kw = {"chat_tokenizer": str(tmp_path / "tok"), "system_prompt": "Answer briefly."}
    write_jsonl(tmp_path / "small.jsonl", records[:5])
    write_jsonl(tmp_path / "test.jsonl", records)
    small = run(tmp_path / "small.jsonl", pair, tmp_path / "small", **kw)
    assert work(small, "ft") == (0, 5) and "heldout/ft/tool_call_acc" in small
    grown = run(tmp_path / "test.jsonl", pair, tmp_path / "grown", **kw)
    assert work(grown, "base") == work(grown, "ft") == (5, 5)
    # Other settings are other generations: nothing of the above is reused.
    assert work(run(tmp_path / "test.jsonl", pair, tmp_path / "other", cfg=CFG.model_copy(update={"max_new_tokens": 3}),
                    **kw), "ft") == (0, 10)
    assert work(run(tmp_path / "small.jsonl", pair, tmp_path / "plain", chat_tokenizer=kw["chat_tokenizer"]),
                "ft") == (0, 5)  # no system prompt

    monkeypatch.setenv("SFTFLOW_HOME", str(tmp_path / "fresh"))
    fresh = run(tmp_path / "test.jsonl", pair, tmp_path / "fresh-run", **kw)
    assert work(fresh, "ft") == (0, 10)
    assert scores(grown) == scores(fresh) and "heldout/delta/tool_call_acc" in grown
    assert (tmp_path / "grown" / "predictions.jsonl").read_text() == \
        (tmp_path / "fresh-run" / "predictions.jsonl").read_text()


def test_a_damaged_entry_is_regenerated(tmp_path, state, models):
    write_jsonl(tmp_path / "small.jsonl", reviews(3))
    write_jsonl(tmp_path / "test.jsonl", reviews(6))
    pair = {"base": models["base"], "ft": models["ft"]}
    run(tmp_path / "small.jsonl", pair, tmp_path / "run1")
    first = run(tmp_path / "test.jsonl", pair, tmp_path / "run2")
    key = item_cache.model_key(models["base"], CFG, None, None)
    entries = sorted((env.state_dir() / "cache" / item_cache.STAGE).glob(f"{key}-*"))
    assert len(entries) == 2  # one per run that generated
    small = next(e for e in entries if len(list(read_jsonl(e / item_cache.ITEMS))) == 3)
    items = small / item_cache.ITEMS
    items.write_bytes(items.read_bytes()[:-20])
    again = run(tmp_path / "test.jsonl", pair, tmp_path / "run3")
    assert work(again, "base") == (3, 3) and work(again, "ft") == (6, 0)
    assert scores(again) == scores(first) and cache.problem(small) is None  # published again, intact
    assert work(run(tmp_path / "test.jsonl", pair, tmp_path / "run4"), "base") == (6, 0)
