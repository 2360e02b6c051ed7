"""GSM8K as calculator-tool conversations, and the held-out `tool_call_acc` of the tool-calling config."""

from sftflow.configs.schema import HeldoutConfig, PreflightConfig, Source
from sftflow.models import load_tokenizer
from sftflow.records import write_jsonl
from sftflow.tasks.data.gsm8k import CALCULATOR
from sftflow.tasks.data.load import load_source
from sftflow.tasks.data.preflight import preflight
from sftflow.tasks.evaluation.heldout import heldout
from sftflow.tasks.evaluation.tool_calls import call_matches, first_calls
from sftflow.tasks.training.template import load_chat_template


def gsm8k(data_root, n=None):
    return load_source(Source(path="gsm8k/train.jsonl", format="gsm8k_calculator", max_records=n), data_root)[0]


def test_worked_answers_become_calculator_calls_and_pass_preflight(data_root):
    records = gsm8k(data_root)  # every row: the sample the preflight checks is the whole file
    natalia = next(r for r in records if r["messages"][0]["content"].startswith("Natalia sold clips"))
    calls = [(m["tool_calls"][0]["function"]["arguments"]["expression"], nxt["content"])
             for m, nxt in zip(natalia["messages"], natalia["messages"][1:]) if m.get("tool_calls")]
    assert calls == [("48/2", "24"), ("48+24", "72")]
    assert natalia["messages"][-1]["content"].startswith("Natalia sold 48/2 = 24 clips in May.")
    assert natalia["messages"][-1]["content"].endswith("#### 72") and "<<" not in natalia["messages"][-1]["content"]
    assert all(r["tools"] == [CALCULATOR] for r in records)
    assert preflight(records, PreflightConfig(), None, 1024)[0] == {}


def test_tool_call_acc_compares_the_first_call_as_the_template_renders_it(tmp_path, tiny_model, data_root):
    tok = load_tokenizer(tiny_model)  # ChatML tokens already: the twin needs no new ones the model lacks
    tok.chat_template = load_chat_template("trl:qwen3_instruct_2507_training")
    tok.save_pretrained(tmp_path / "tok")
    tok_dir = str(tmp_path / "tok")
    records = gsm8k(data_root, 3)
    calls = first_calls(tok, records, None)
    assert [c[0] for c in calls] == [0, 1, 2] and all(c[1][-1]["role"] == "user" for c in calls)
    expected = calls[0][2]
    assert expected.startswith('<tool_call> {"name": "calculator", "arguments": {"expression": ')
    assert call_matches(tok, [f"{expected.replace(' ', '  ')}<|im_end|>", "<tool_call>"], [expected] * 2) == [1.0, 0.0]
    write_jsonl(tmp_path / "test.jsonl", records)
    models = {"base": {"path": tiny_model}, "ft": {"path": tiny_model}}
    out = heldout(str(tmp_path / "test.jsonl"), models, HeldoutConfig(max_new_tokens=4), out_dir=tmp_path,
                  bootstrap_iters=50, chat_tokenizer=tok_dir)
    m = out["metrics"]
    assert 0.0 <= m["heldout/ft/tool_call_acc"] <= 1.0 and m["heldout/delta/tool_call_acc"] == 0.0
