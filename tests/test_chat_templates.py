"""Every chat template TRL ships, rendered and masked single- and multi-turn: the trained text is the assistant
turns' content and end of turn, whichever mask source the template gets (its markers, TRL's twin, prefixes)."""

import json
import re

import pytest
from trl_templates import saved_tokenizer, tokenizer_for, trained_runs, trained_text, trl_templates

from sftflow.configs.schema import TemplateConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.stage_summary import stage_summary
from sftflow.tasks.training.chat import chat_messages, has_markers, rendering_with, training_template
from sftflow.tasks.training.template import TemplateError, template, tokenize

SINGLE = [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "POS"}]
MULTI = [{"role": "system", "content": "Be terse."}, *SINGLE, {"role": "user", "content": "Sure?"},
         {"role": "assistant", "content": "yes indeed"}]
PROMPT_TEXT = ("Is it good?", "Sure?", "Be terse.")
# What a twin trains around a turn's text besides whitespace and tags: gpt-oss and muse-glimmer open each
# assistant turn with a channel header inside their generation block (TRL's choice), others nothing.
HEADER_WORDS = {"", "assistant", "assistantfinal", "assistantto=user"}
TAGS = re.compile(r"<[^<>\s]{1,40}>|\s")
# gpt-oss ends its last turn with <|return|>, its other turns with <|end|> (both are its eos tokens).
LAST_TURN_END = {"gptoss": ("<|return|>",), "gptoss_training": ("<|return|>",)}
# Templates TRL knows by their text and swaps for a training twin; the rest have markers or are prefix-stable.
NEEDS_TWIN = {"qwen3", "deepseek_r1_distill", "deepseekv3", "nemotron_3_nano", "nemotron_3_super",
              "nemotron_3_ultra", "nemotron_3_5_lightning", "phi3", "phi3_5"}


def mask_of(tok, messages, reasoning="keep", tools=None):
    source, training = training_template(tok)
    with rendering_with(tok, training):
        return source, tokenize(tok, chat_messages(messages, reasoning, training), tools)


@pytest.mark.parametrize("name", sorted(trl_templates()))
@pytest.mark.parametrize("convo", [SINGLE, MULTI], ids=["single", "multi"])
def test_every_trl_template_trains_exactly_the_assistant_turns(tiny_model, name, convo):
    tok = tokenizer_for(tiny_model, trl_templates()[name])
    eot = tok.eos_token
    if name.startswith("gemma_") or name == "gemma":  # Gemma 1 refuses a system turn (its own raise_exception)
        convo = [m for m in convo if m["role"] != "system"]
    source, row = mask_of(tok, convo)
    expected = "markers" if has_markers(trl_templates()[name]) else "trl_twin" if name in NEEDS_TWIN else None
    assert source == expected if expected else source in ("trl_twin", "prefix")
    answers = [m["content"] for m in convo if m["role"] == "assistant"]
    runs = trained_runs(tok, row)
    assert len(runs) == len(answers), runs
    for run, answer in zip(runs, answers):
        head, found, tail = run.replace("<think></think>", "").partition(answer)
        assert found, (run, answer)
        assert TAGS.sub("", head) in HEADER_WORDS, run
        assert tail.lstrip().startswith((eot, *LAST_TURN_END.get(name, ()))) and not TAGS.sub("", tail), run
    assert not any(p in trained_text(tok, row) for p in PROMPT_TEXT)
    assert row["audit"]["turns"] == len(answers)
    assert row["audit"]["eos_trained_turns"] == len(answers) - (name in LAST_TURN_END)


@pytest.mark.parametrize("name, trained", [
    ("qwen3", "<think>\n\n</think>\n\nPOS<|im_end|>\n<think>\n\n</think>\n\nyes indeed<|im_end|>\n"),
    ("deepseek_r1_distill",
     "<｜Assistant｜>POS<｜end▁of▁sentence｜><｜Assistant｜>yes indeed<｜end▁of▁sentence｜>"),
    ("nemotron_3_nano", "<think></think>POS<|im_end|>\n<think></think>yes indeed<|im_end|>\n"),
    ("nemotron_3_super", "<think></think>POS<|im_end|>\n<think></think>yes indeed<|im_end|>\n"),
    ("phi3", "POS<|end|>\nyes indeed<|end|>\n<|end|>"),
    ("phi3_5", "POS<|end|>\nyes indeed<|end|>\n<|end|>"),
])
def test_multi_turn_templates_that_are_not_prefix_stable_train_through_the_twin(tiny_model, name, trained):
    tok = tokenizer_for(tiny_model, trl_templates()[name])
    source, row = mask_of(tok, MULTI)
    assert source == "trl_twin" and trained_text(tok, row) == trained
    with pytest.raises(TemplateError, match="prefix-stable"):  # the template alone cannot be masked
        tokenize(tok, MULTI)


@pytest.mark.parametrize("name, trained", [
    ("qwen3", "<think>\nweigh it\n</think>\n\nPOS<|im_end|>\n"),
    ("deepseek_r1_distill", "<｜Assistant｜><think>\nweigh it\n</think>\n\nPOS<｜end▁of▁sentence｜>"),
])
def test_reasoning_is_rendered_the_way_the_template_expects_and_trained(tiny_model, name, trained):
    tok = tokenizer_for(tiny_model, trl_templates()[name])
    convo = [SINGLE[0], {**SINGLE[1], "reasoning_content": "weigh it"}]
    assert trained_text(tok, mask_of(tok, convo)[1]) == trained
    stripped = trained_text(tok, mask_of(tok, convo, reasoning="strip")[1])
    assert "weigh it" not in stripped and "POS" in stripped


def run_stage(tmp_path, tokenizer_dir, records, **cfg):
    write_jsonl(tmp_path / "s.jsonl", records)
    paths = {"train": str(tmp_path / "s.jsonl"), "val": str(tmp_path / "s.jsonl")}
    return template(paths, tokenizer_dir, TemplateConfig(**cfg), out_dir=tmp_path / "out")


def test_the_stage_says_which_mask_source_it_used_and_keeps_the_tokenizers_own_template(tmp_path, tiny_model):
    qwen3 = trl_templates()["qwen3"]
    tokenizer_dir = saved_tokenizer(tiny_model, qwen3, tmp_path / "tok")
    records = [{"id": f"r{i}", "messages": MULTI, "file": "f.jsonl", "index": i + 1} for i in range(3)]
    out = run_stage(tmp_path, tokenizer_dir, records)
    assert out["params"]["template.mask_source"] == "trl_twin" and out["params"]["template.trl_template"] == "qwen3"
    assert "mask trl_twin" in stage_summary("template", out["metrics"], out["params"])
    assert "Mask source: **trl_twin**" in (tmp_path / "out" / "masked_samples.md").read_text()
    assert json.loads((tmp_path / "out" / "template.json").read_text())["mask_source"] == "trl_twin"
    from sftflow.models import load_tokenizer

    assert load_tokenizer(out["paths"]["tokenizer"]).chat_template == qwen3  # generation uses the real template
    row = next(read_jsonl(tmp_path / "out" / "train.tokens.jsonl"))
    assert sum(row["assistant_masks"]) > 0


def test_a_template_with_no_source_of_masks_fails_closed(tmp_path, tiny_model):
    # Renders the last message first: no markers, no twin, no prefix that holds.
    reversed_template = ("{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer_dir = saved_tokenizer(tiny_model, reversed_template, tmp_path / "tok")
    with pytest.raises(TemplateError, match="prefix-stable"):
        run_stage(tmp_path, tokenizer_dir, [{"id": "r0", "messages": MULTI, "file": "f.jsonl", "index": 1}])
