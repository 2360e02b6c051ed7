"""Tool calling and reasoning: the record shapes that load, the pre-flight rules that reject bad ones (each with its
file:line), rendering through the template's tool support, and masks that train calls and answers, never results."""

import json

import pytest
from trl_templates import saved_tokenizer, tokenizer_for, trained_runs, trained_text, trl_templates

from sftflow.configs.schema import PreflightConfig, Source, TemplateConfig
from sftflow.records import read_jsonl, write_jsonl
from sftflow.tasks.data.load import load_source
from sftflow.tasks.data.preflight import PreflightError, preflight, where
from sftflow.tasks.training.chat import chat_messages, rendering_with, training_template
from sftflow.tasks.training.template import TemplateError, template, tokenize

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                        "b": {"type": "number"}}}}}
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
TOOL_CHAT = [{"role": "user", "content": "What is 2+3?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "name": "add", "content": "RESULT 5"},
             {"role": "assistant", "content": "It is 5."}]
SHAREGPT = {"conversations": [{"from": "human", "value": "What is 2+3?"},
                              {"from": "function_call", "value": json.dumps(CALL["function"])},
                              {"from": "observation", "value": "RESULT 5"},
                              {"from": "gpt", "value": "It is 5."}],
            "tools": json.dumps([ADD["function"]]), "system": "Use tools."}


def load_rows(tmp_path, rows):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_source(Source(path="t.jsonl"), tmp_path)


def test_messages_and_sharegpt_function_calls_load_to_one_shape(tmp_path):
    records, rejects, _ = load_rows(tmp_path, [{"messages": TOOL_CHAT, "tools": [ADD]}, SHAREGPT])
    assert not rejects
    plain, sharegpt = records
    assert plain["messages"] == TOOL_CHAT and plain["tools"] == [ADD]
    assert sharegpt["messages"][0] == {"role": "system", "content": "Use tools."}
    assert [{k: v for k, v in m.items() if k != "name"} for m in sharegpt["messages"][1:]] == \
        [{k: v for k, v in m.items() if k != "name"} for m in TOOL_CHAT]
    assert sharegpt["tools"] == [ADD]
    assert preflight(records, PreflightConfig(), None, 512)[0] == {}


def test_reasoning_fields_and_think_blocks_are_kept_on_the_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "<think>\nweigh it\n</think>\n\nPOS"}]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "POS", "reasoning_content": "weigh it"}]}]
    records, _, _ = load_rows(tmp_path, rows)
    assert [r["messages"][1] for r in records] == [{"role": "assistant", "content": "POS",
                                                   "reasoning_content": "weigh it"}] * 2


def with_turn(index, **change):
    return {"messages": [{**m, **change} if i == index else m for i, m in enumerate(TOOL_CHAT)], "tools": [ADD]}


BAD = [  # (line, rule): each line one way a tool-calling record goes wrong
    (2, "tool_call_without_result", {"messages": [TOOL_CHAT[0], TOOL_CHAT[1], {"role": "user", "content": "and?"},
                                                  TOOL_CHAT[3]], "tools": [ADD]}),
    (3, "invalid_tool_arguments", with_turn(1, tool_calls=[{"function": {"name": "add", "arguments": "{a: 2"}}])),
    (4, "unknown_function", with_turn(1, tool_calls=[{"function": {"name": "mul", "arguments": "{}"}}])),
    (5, "tool_result_without_call", {"messages": [TOOL_CHAT[0], TOOL_CHAT[2], TOOL_CHAT[3]], "tools": [ADD]}),
    (6, "reasoning_on_non_assistant_turn", with_turn(0, reasoning_content="user thoughts")),
]


def test_each_bad_tool_record_is_rejected_with_its_line_and_rule_and_the_counts_add_up(tmp_path):
    unreadable = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "add(2, 3)"}]}
    rows = [{"messages": TOOL_CHAT, "tools": [ADD]}, *(row for _, _, row in BAD), unreadable, SHAREGPT]
    records, load_rejects, available = load_rows(tmp_path, rows)
    assert [(r["index"], r["reason"]) for r in load_rejects] == \
        [(7, "wrong schema: conversations[1] value holds text that is not JSON")]
    errors, _, report = preflight(records, PreflightConfig(max_error_share=1.0), None, 512, load_rejects=load_rejects)
    assert {r["index"]: errors[r["id"]] for r in records if r["id"] in errors} == {line: rule for line, rule, _ in BAD}
    assert available == len(records) + len(load_rejects) == 8 and report["errors"] == len(BAD)
    with pytest.raises(PreflightError) as failed:  # 6 of 8 invalid: over the limit, the run stops
        preflight(records, PreflightConfig(max_error_share=0.5), None, 512, load_rejects=load_rejects)
    assert "t.jsonl:2: preflight:tool_call_without_result" in str(failed.value)
    assert "t.jsonl:7: wrong schema" in str(failed.value)
    bad = next(r for r in records if r["index"] == 4)
    assert where({**bad, "reason": errors[bad["id"]]}) == "t.jsonl:4: unknown_function"


WRONG_SCHEMA = [  # one malformed tool-calling shape a line -> what its reject says
    (with_turn(1, tool_calls=[{"function": {"arguments": "{}"}}]), "tool_calls[0] is not a call with a function name"),
    (with_turn(1, tool_calls=[{"function": {"name": "add", "arguments": 5}}]), "arguments must be a JSON object"),
    (with_turn(0, tool_calls=[CALL]), "has tool_calls but role 'user'"),
    ({"messages": TOOL_CHAT, "tools": ADD}, "'tools' must be a list of function schemas"),
    ({"messages": TOOL_CHAT, "tools": [{"type": "function", "function": {}}]}, "tools[0] is not a function schema"),
    ({"conversations": ["hello", *SHAREGPT["conversations"]]}, "conversations[0] is not an object"),
]


def test_each_wrong_tool_schema_is_a_load_reject_with_its_line_and_what_is_wrong(tmp_path):
    records, rejects, available = load_rows(tmp_path, [{"messages": TOOL_CHAT, "tools": [ADD]},
                                                       *(row for row, _ in WRONG_SCHEMA)])
    assert len(records) == 1 and available == 1 + len(WRONG_SCHEMA) == len(records) + len(rejects)
    for reject, (_, said) in zip(rejects, WRONG_SCHEMA):
        assert reject["reason"].startswith("wrong schema: ") and said in reject["reason"], (reject, said)
    assert [r["index"] for r in rejects] == list(range(2, 2 + len(WRONG_SCHEMA)))


def test_a_call_id_is_kept_and_sharegpt_calls_attach_to_the_answer_before_them(tmp_path):
    with_id = with_turn(1, tool_calls=[{**CALL, "id": "call_7"}])
    split = {**SHAREGPT, "conversations": [SHAREGPT["conversations"][0], {"from": "gpt", "value": "Let me add."},
                                           *SHAREGPT["conversations"][1:]]}
    records, rejects, _ = load_rows(tmp_path, [with_id, split])
    assert not rejects, rejects
    assert records[0]["messages"][1]["tool_calls"][0]["id"] == "call_7"
    turn = next(m for m in records[1]["messages"] if m["role"] == "assistant")
    assert turn["content"] == "Let me add." and turn["tool_calls"][0]["function"]["name"] == "add"


@pytest.mark.parametrize("name", ["qwen3", "deepseekv3", "nemotron_3_nano", "qwen2_5", "llama3_1", "gptoss"])
def test_calls_and_answers_are_trained_never_the_tool_results(tiny_model, name):
    tok = tokenizer_for(tiny_model, trl_templates()[name])
    source, training = training_template(tok)
    with rendering_with(tok, training):
        row = tokenize(tok, chat_messages(TOOL_CHAT, "keep", training), [ADD])
        if "tools" in training:  # the schemas went to the template (DeepSeek-V3's shows none)
            assert "Add two numbers" in tok.decode(row["input_ids"])
    runs = trained_runs(tok, row)
    assert len(runs) == 2 and "add" in runs[0] and "2" in runs[0] and "3" in runs[0] and "It is 5." in runs[1]
    assert "RESULT" not in trained_text(tok, row) and "RESULT 5" in tok.decode(row["input_ids"])


def stage_on(tmp_path, tiny_model, name, records, **cfg):
    tokenizer_dir = saved_tokenizer(tiny_model, trl_templates()[name], tmp_path / "tok")
    write_jsonl(tmp_path / "s.jsonl", records)
    paths = {"train": str(tmp_path / "s.jsonl"), "val": str(tmp_path / "s.jsonl")}
    return template(paths, tokenizer_dir, TemplateConfig(max_length=2048, **cfg), out_dir=tmp_path / "out")


def record(i, messages, **extra):
    return {"id": f"r{i}", "messages": messages, "file": "t.jsonl", "index": i + 1, **extra}


def test_tool_records_through_the_template_stage_train_the_calls(tmp_path, tiny_model):
    out = stage_on(tmp_path, tiny_model, "qwen3", [record(i, TOOL_CHAT, tools=[ADD]) for i in range(2)])
    assert out["metrics"]["template/tool_records"] == 4 and out["params"]["template.mask_source"] == "trl_twin"
    samples = (tmp_path / "out" / "masked_samples.md").read_text()
    assert '[[<think>\n\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}' in samples
    assert "[[<think>\n\n</think>\n\nIt is 5.<|im_end|>\n]]" in samples and "[[RESULT" not in samples


@pytest.mark.parametrize("name", ["phi3", "deepseek_r1_distill", "llama3"])
def test_a_template_without_tool_support_is_named_before_any_record_is_tokenized(tmp_path, tiny_model, name):
    with pytest.raises(TemplateError, match=f"chat template '{name}' .*has no tool-calling support.*t.jsonl:1"):
        stage_on(tmp_path, tiny_model, name, [record(0, TOOL_CHAT, tools=[ADD])])
    assert not (tmp_path / "out" / "train.tokens.jsonl").exists()


@pytest.mark.parametrize("reasoning, trained", [
    ("keep", "[[<think>\nweigh it\n</think>\n\nPOS<|im_end|>\n]]"),
    ("strip", "[[<think>\n\n</think>\n\nPOS<|im_end|>\n]]"),
])
def test_reasoning_is_kept_and_trained_or_stripped(tmp_path, tiny_model, reasoning, trained):
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "POS", "reasoning_content": "weigh it"}]
    out = stage_on(tmp_path, tiny_model, "qwen3", [record(0, convo)], reasoning=reasoning)
    assert trained in (tmp_path / "out" / "masked_samples.md").read_text()
    assert out["params"]["template.reasoning"] == reasoning
    assert list(read_jsonl(tmp_path / "out" / "train.tokens.jsonl"))


def test_a_call_only_turn_passes_the_filters_and_calls_tell_records_apart():
    from sftflow.configs.schema import CurateConfig
    from sftflow.tasks.data.dedup.exact import content_key
    from sftflow.tasks.data.filters import filter_reason

    rec = record(0, TOOL_CHAT, tools=[ADD])
    other = with_turn(1, tool_calls=[{**CALL, "function": {"name": "add", "arguments": {"a": 2, "b": 4}}}])
    assert filter_reason(rec, CurateConfig()) is None
    assert content_key(rec) != content_key(record(1, other["messages"]))
