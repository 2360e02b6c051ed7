import hashlib

import pytest
from conftest import make_record, template_splits

from sftflow.configs.schema import TemplateConfig
from sftflow.models import load_tokenizer
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.training.template import (
    TemplateError,
    load_chat_template,
    render,
    render_masked,
    shipped_templates,
    template,
    tokenize,
    with_system,
)

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
    out = template_splits(tmp_path, tiny_model, train, train[:2], max_length=128)
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
    monkeypatch.setattr("sftflow.tasks.training.template.load_tokenizer", lambda *a: tok)
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


# --- custom templates, sandbox, hash ---------------------------------------------------------------

def fresh_tok(tiny_model, tiny_tokenizer, chat_template=None):
    tok = type(tiny_tokenizer).from_pretrained(tiny_model)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def test_shipped_templates_have_generation_markers_and_load_by_name():
    shipped = shipped_templates()
    assert {"chatml", "llama3"} <= shipped.keys()
    assert all("{% generation %}" in text for text in shipped.values())
    assert load_chat_template("chatml") == shipped["chatml"]
    with pytest.raises(TemplateError, match="chatml, llama3"):
        load_chat_template("no-such-template")


def test_llama3_template_trains_assistant_content_and_eot(tiny_model, tiny_tokenizer):
    tok = fresh_tok(tiny_model, tiny_tokenizer, load_chat_template("llama3"))
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                            "eos_token": "<|eot_id|>"})
    row = tokenize(tok, CONVO)
    assert trained_text(tok, row) == "POS<|eot_id|>yes indeed<|eot_id|>"
    assert row["audit"] == {"tokens": len(row["input_ids"]), "trained": sum(row["assistant_masks"]), "turns": 2,
                            "eos_trained_turns": 2, "prompt_tokens": row["audit"]["prompt_tokens"],
                            "prompt_trained": 0}


def test_templates_render_in_a_sandbox(tiny_model, tiny_tokenizer):
    from jinja2.exceptions import SecurityError

    tok = fresh_tok(tiny_model, tiny_tokenizer, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        render(tok, CONVO)


def test_custom_template_file_is_hashed_and_saved_with_the_tokenizer(tmp_path, tiny_model):
    custom = "{#- our team's ChatML -#}\n" + load_chat_template("chatml")
    (tmp_path / "mine.jinja").write_text(custom)
    write_jsonl(tmp_path / "s.jsonl", [make_record(i, f"text {i}", "POS") for i in range(3)])
    paths = {"train": str(tmp_path / "s.jsonl"), "val": str(tmp_path / "s.jsonl")}
    out = template(paths, tiny_model, TemplateConfig(chat_template=str(tmp_path / "mine.jinja"),
                                                     system_prompt="Answer POS or NEG."), out_dir=tmp_path / "o")
    assert out["params"]["template.chat_template_sha256"] == hashlib.sha256(custom.encode()).hexdigest()
    saved = load_tokenizer(out["paths"]["tokenizer"])
    assert saved.chat_template == custom
    text = (tmp_path / "o" / "masked_samples.md").read_text()
    assert "<|im_start|>system\nAnswer POS or NEG." in text and "[[POS<|im_end|>]]" in text


# --- the loss-mask audit ---------------------------------------------------------------------------

def run_template_with(tmp_path, tiny_model, tiny_tokenizer, monkeypatch, chat_template):
    tok = fresh_tok(tiny_model, tiny_tokenizer, chat_template)
    monkeypatch.setattr("sftflow.tasks.training.template.load_tokenizer", lambda *a: tok)
    write_jsonl(tmp_path / "s.jsonl", [make_record(i, f"fine {i}", "POS") for i in range(3)])
    paths = {"train": str(tmp_path / "s.jsonl"), "val": str(tmp_path / "s.jsonl")}
    return template(paths, tiny_model, TemplateConfig(), out_dir=tmp_path)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
          "{% if m['role'] == 'assistant' %}ASSISTANT{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
          "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_audit_fails_a_template_that_trains_nothing(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    # Generation markers that wrap nothing: the answer is rendered outside them.
    nothing = CHATML.replace("ASSISTANT", "{{ m['content'] + '<|im_end|>' }}{% generation %}{% endgeneration %}")
    with pytest.raises(TemplateError, match="no token of any record is trained"):
        run_template_with(tmp_path, tiny_model, tiny_tokenizer, monkeypatch, nothing)


def test_audit_fails_a_template_that_never_trains_eos(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    # Markers around the content only: the end-of-turn token falls outside them.
    no_eos = CHATML.replace("ASSISTANT", "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
    with pytest.raises(TemplateError, match="end-of-turn"):
        run_template_with(tmp_path, tiny_model, tiny_tokenizer, monkeypatch, no_eos)


def test_audit_fails_a_template_that_trains_everything(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    everything = "{% generation %}" + CHATML.replace("ASSISTANT", "{{ m['content'] + '<|im_end|>' }}") + \
        "{% endgeneration %}"
    with pytest.raises(TemplateError, match="every token is trained"):
        run_template_with(tmp_path, tiny_model, tiny_tokenizer, monkeypatch, everything)


def test_audit_measures_trained_prompt_tokens(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    # The assistant header sits inside the markers: trained although it is prompt (the generation prompt).
    header = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
              "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    m = run_template_with(tmp_path, tiny_model, tiny_tokenizer, monkeypatch, header)["metrics"]
    assert m["template/train/records_with_prompt_trained_share"] == 1.0
    assert 0 < m["template/train/prompt_tokens_trained"] < m["template/train/prompt_tokens"]
    assert m["template/train/eos_trained_share"] == 1.0


def test_llama3_template_on_a_chatml_tokenizer_fails_the_eos_audit(tmp_path, tiny_model):
    # The tokenizer's eos is <|im_end|>; a Llama-3 template ends turns with <|eot_id|>: never trained.
    write_jsonl(tmp_path / "s.jsonl", [make_record(0, "fine", "POS")])
    paths = {"train": str(tmp_path / "s.jsonl"), "val": str(tmp_path / "s.jsonl")}
    with pytest.raises(TemplateError, match="end-of-turn"):
        template(paths, tiny_model, TemplateConfig(chat_template="llama3"), out_dir=tmp_path)
