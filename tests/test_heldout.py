import json

import pytest
from conftest import make_record

from sftflow.configs.schema import HeldoutConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.evaluation.heldout import generate, heldout, label_report, normalise_label, score


def test_label_normalisation_and_scores():
    assert normalise_label("Positive.\nBecause...") == "positive"
    s = score(["POS", "pos", "NEG"], ["POS", "POS", "NEG"])
    assert s["exact_match"] == 2 / 3 and s["label_acc"] == 1.0


def test_macro_f1_and_confusion_with_an_off_label_answer():
    preds = ["POS", "POS", "NEG", "maybe", "NEG", "neg."]
    labels = ["POS", "NEG", "NEG", "NEG", "POS", "NEG"]
    out = label_report(preds, labels)
    # pos: tp 1, fp 1, fn 1 -> F1 0.5; neg: tp 2, fp 1, fn 2 -> F1 4/7
    assert out["macro_f1"] == pytest.approx((0.5 + 4 / 7) / 2)
    assert out["confusion"] == {"labels": ["neg", "pos"], "predicted": ["neg", "pos", "<other>"],
                                "matrix": [[2, 1, 1], [1, 1, 0]]}


def test_batched_generation_with_a_shared_opening_matches_one_prompt_at_a_time(opinionated_model, tiny_tokenizer):
    from sftflow.tasks.training.template import render

    definition = "In this task you are given a review. Classify it as positive or negative. " * 2
    convs = [[{"role": "system", "content": "You are a careful annotator."},
              {"role": "user", "content": definition + "review " + "x" * n}] for n in (3, 40, 11, 25, 7)]
    convs += [[{"role": "user", "content": "short " * n}] for n in (1, 4)]  # nothing long shared
    batched = generate(opinionated_model, tiny_tokenizer, convs, max_new_tokens=5, batch_size=2)
    single = []
    for c in convs:  # each prompt alone: no padding, no prefix cache
        ids = tiny_tokenizer(render(tiny_tokenizer, c, add_generation_prompt=True), add_special_tokens=False,
                             return_tensors="pt")["input_ids"]
        out = opinionated_model.generate(ids, max_new_tokens=5, do_sample=False,
                                         pad_token_id=tiny_tokenizer.pad_token_id,
                                         eos_token_id=tiny_tokenizer.eos_token_id)
        single.append(tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert batched == single and len(set(single)) >= 5


def test_heldout_scores_every_model_against_base_and_writes_artifacts(tmp_path, tiny_model):
    write_jsonl(tmp_path / "test.jsonl", [make_record(i, f"review {i}", "POS" if i % 2 else "NEG",
                                                      label="POS" if i % 2 else "NEG") for i in range(7)])
    models = {"base": {"path": tiny_model}, "ft": {"path": tiny_model}, "ft_best": {"path": tiny_model}}
    out = heldout(str(tmp_path / "test.jsonl"), models, HeldoutConfig(max_new_tokens=3, limit=6, examples=2),
                  out_dir=tmp_path, bootstrap_iters=200)
    m = out["metrics"]
    assert m["heldout/records"] == 6
    assert m["heldout/delta/exact_match"] == 0.0  # the same model on every side
    assert m["heldout/delta/label_acc/ci_low"] == m["heldout/delta/label_acc/ci_high"] == 0.0
    assert m["heldout/delta/label_acc/p_value"] == 1.0 and m["heldout/delta/macro_f1"] == 0.0
    assert m["heldout/delta/ft_best/label_acc"] == 0.0  # extra models get their own prefix
    assert 0.0 <= m["heldout/ft/macro_f1"] <= 1.0
    assert sum(map(sum, out["confusion"]["ft"]["matrix"])) == 6
    rows = list(read_jsonl(tmp_path / "predictions.jsonl"))
    assert len(rows) == 6 and rows[0]["reference"] == "NEG" and {"ft_prediction", "ft_best_prediction"} <= set(rows[0])
    examples = (tmp_path / "examples.md").read_text()
    assert examples.count("- reference:") == 2 and "- ft_best:" in examples and "review 0" in examples
    assert m.pop("heldout/cache_hit") == 0  # no content digests: never cached
    assert json.loads((tmp_path / "heldout.json").read_text())["metrics"] == m


def test_macro_f1_matches_sklearn_and_its_delta_ci_brackets_the_point_estimate():
    import numpy as np
    from sklearn.metrics import f1_score

    from sftflow import stats

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 120)
    base = np.where(rng.random(120) < 0.5, truth, rng.integers(-1, 3, 120))
    ft = np.where(rng.random(120) < 0.8, truth, rng.integers(-1, 3, 120))
    for pred in (base, ft):
        assert stats.macro_f1(truth, pred, 3) == pytest.approx(
            f1_score(truth, pred, labels=[0, 1, 2], average="macro", zero_division=0))
    delta = stats.macro_f1(truth, ft, 3) - stats.macro_f1(truth, base, 3)
    low, high = stats.macro_f1_delta_ci(truth, base, ft, 3, iters=500)
    assert 0 < low < delta < high


def test_side_by_side_shows_disagreements_first():
    from sftflow.tasks.evaluation.heldout import side_by_side

    rows = [{"id": f"r{i}", "source": "s", "prompt": f"p{i}", "reference": "POS", "base_prediction": b,
             "ft_prediction": f} for i, (b, f) in enumerate([("POS", "POS"), ("", "POS"), ("NEG", "NEG")])]
    md = side_by_side(rows, ["base", "ft"], limit=2)
    assert md.index("## r1") < md.index("## r0") and "## r2" not in md and "- base: (empty)" in md


def test_the_base_model_generates_with_the_given_training_chat_template(tmp_path, tiny_model, tiny_tokenizer):
    # The base model comes first; a template that refuses to render proves it is the one in use.
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ raise_exception('the training template') }}")
    write_jsonl(tmp_path / "test.jsonl", [make_record(i, f"review {i}", "POS") for i in range(3)])
    models = {"base": {"path": tiny_model}, "ft": {"path": tiny_model}}
    args = (str(tmp_path / "test.jsonl"), models, HeldoutConfig(max_new_tokens=2))
    heldout(*args, out_dir=tmp_path, bootstrap_iters=50)  # the model's own template renders
    with pytest.raises(Exception, match="the training template"):
        heldout(*args, out_dir=tmp_path, bootstrap_iters=50, chat_tokenizer=str(tmp_path / "tok"))
