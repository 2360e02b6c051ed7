from conftest import make_record

from sftflow.configs.schema import HeldoutConfig
from sftflow.models import load_causal_lm
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.heldout import generate, heldout, normalise_label, score


def test_label_normalisation_and_scores():
    assert normalise_label("Positive.\nBecause...") == "positive"
    s = score(["POS", "pos", "NEG"], ["POS", "POS", "NEG"])
    assert s["exact_match"] == 2 / 3 and s["label_acc"] == 1.0


def test_batched_generation_matches_one_by_one(tiny_model, tiny_tokenizer):
    model = load_causal_lm(tiny_model).eval()
    convs = [[{"role": "user", "content": "x" * n}] for n in (3, 40, 11, 25)]
    batched = generate(model, tiny_tokenizer, convs, max_new_tokens=5, batch_size=4)
    single = [generate(model, tiny_tokenizer, [c], max_new_tokens=5, batch_size=1)[0] for c in convs]
    assert batched == single


def test_heldout_scores_base_and_ft_and_writes_predictions(tmp_path, tiny_model):
    write_jsonl(tmp_path / "test.jsonl", [make_record(i, f"review {i}", "POS", label="POS") for i in range(5)])
    models = {"base": {"path": tiny_model}, "ft": {"path": tiny_model}}
    out = heldout(str(tmp_path / "test.jsonl"), models, HeldoutConfig(max_new_tokens=3, limit=4), out_dir=tmp_path)
    m = out["metrics"]
    assert m["heldout/records"] == 4
    assert m["heldout/delta/exact_match"] == 0.0  # the same model on both sides
    rows = list(read_jsonl(tmp_path / "predictions.jsonl"))
    assert len(rows) == 4 and rows[0]["reference"] == "POS" and "ft_prediction" in rows[0]
