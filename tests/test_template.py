import pytest
from conftest import make_record

from sftflow.configs.schema import TemplateConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.template import TemplateError, render_masked, template, tokenize, with_system

CONVO = [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "POS"},
         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes indeed"}]


def trained_text(tok, row):
    return "".join(tok.decode([t]) for t, m in zip(row["input_ids"], row["assistant_masks"]) if m)


def test_only_assistant_turns_and_their_end_of_turn_are_trained(tiny_tokenizer):
    row = tokenize(tiny_tokenizer, CONVO)
    assert trained_text(tiny_tokenizer, row) == "POS<|im_end|>yes indeed<|im_end|>"
    assert render_masked(tiny_tokenizer, row).count("[[") == 2
    assert tiny_tokenizer.decode(row["input_ids"]) == tiny_tokenizer.apply_chat_template(CONVO, tokenize=False)


def test_system_prompt_is_prepended_once():
    msgs = with_system(CONVO, "Be terse.")
    assert msgs[0] == {"role": "system", "content": "Be terse."}
    assert with_system(msgs, "other") == msgs


def test_template_stage_rejects_overlong_and_reports_shares(tmp_path, tiny_model):
    train = [make_record(i, f"short review {i}", "POS") for i in range(4)] + [make_record(9, "long " * 400, "NEG")]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", train[:2])
    out = template({"train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "val.jsonl")},
                   tiny_model, TemplateConfig(max_length=128), out_dir=tmp_path)
    m = out["metrics"]
    assert m["template/train/records"] == 4 and m["template/rejected"] == 1
    assert m["template/train/eos_trained_share"] == 1.0 and 0 < m["template/train/trained_share"] < 0.5
    rejects = list(read_jsonl(tmp_path / "template_rejects.jsonl"))
    assert rejects[0]["id"] == "r0009" and rejects[0]["reason"].startswith("exceeds_max_length")
    assert "[[POS<|im_end|>]]" in (tmp_path / "masked_samples.md").read_text()


def test_template_that_never_trains_eos_fails_loudly(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    # A template that closes assistant turns with no end-of-turn token: the model would never learn to stop.
    no_eos = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
              "{% if m['role'] != 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = type(tiny_tokenizer).from_pretrained(tiny_model)
    tok.chat_template = no_eos
    monkeypatch.setattr("sftflow.tasks.template.load_tokenizer", lambda *a: tok)
    write_jsonl(tmp_path / "s.jsonl", [make_record(0, "fine", "POS")])
    paths = {"train": str(tmp_path / "s.jsonl"), "val": str(tmp_path / "s.jsonl")}
    with pytest.raises(TemplateError, match="end-of-turn"):
        template(paths, tiny_model, TemplateConfig(), out_dir=tmp_path)


def test_template_that_is_not_prefix_stable_is_refused(tiny_model, tiny_tokenizer):
    # Renders the last message first: earlier turns are not a prefix of the whole.
    tok = type(tiny_tokenizer).from_pretrained(tiny_model)
    tok.chat_template = ("{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize(tok, CONVO)
