import pytest
from conftest import make_record

from sftflow.configs.schema import PreflightConfig
from sftflow.tasks.data.preflight import STRUCTURE, PreflightError, preflight, structure_error


def convo(*turns):
    r = make_record(0, "q", "a")
    r["messages"] = [{"role": role, "content": text} for role, text in turns]
    return r


@pytest.mark.parametrize("rule, record", [
    ("no_messages", convo()),
    ("unknown_role", convo(("user", "hi"), ("wizard", "x"), ("assistant", "ok"))),
    ("system_not_first", convo(("user", "hi"), ("system", "be nice"), ("assistant", "ok"))),
    ("empty_turn", convo(("user", "  "), ("assistant", "ok"))),
    ("no_assistant_turn", convo(("user", "hi"), ("user", "anyone?"))),
    ("assistant_before_user", convo(("system", "s"), ("assistant", "hello"), ("user", "hi"), ("assistant", "ok"))),
    ("consecutive_assistant_turns", convo(("user", "hi"), ("assistant", "a"), ("assistant", "b"))),
    ("no_final_assistant_turn", convo(("user", "hi"), ("assistant", "a"), ("user", "and?"))),
])
def test_each_structure_rule(rule, record):
    assert structure_error(record) == rule
    assert set(STRUCTURE) >= {rule}


def test_valid_multi_turn_passes():
    assert structure_error(convo(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"),
                                 ("assistant", "d"))) is None


def test_token_counts_truncation_share_and_total(tiny_model, tiny_tokenizer):
    records = [make_record(i, "word " * (5 + 40 * i), "ok") for i in range(4)]
    lengths = [len(tiny_tokenizer(tiny_tokenizer.apply_chat_template(r["messages"], tokenize=False),
                                  add_special_tokens=False)["input_ids"]) for r in records]
    errors, tokens, report = preflight(records, PreflightConfig(), tiny_model, max_length=lengths[1])
    assert not errors and list(tokens.values()) == lengths
    t = report["tokens"]
    assert t["total"] == sum(lengths) and t["max"] == lengths[-1]
    assert t["over_max_length"] == 2 and t["over_max_length_share"] == 0.5


def test_system_prompt_is_counted(tiny_model):
    rec = [make_record(0, "hello", "ok")]
    _, plain, _ = preflight(rec, PreflightConfig(), tiny_model, 512)
    _, with_sys, _ = preflight(rec, PreflightConfig(), tiny_model, 512, system_prompt="You are a careful rater.")
    assert with_sys["r0000"] > plain["r0000"]


def test_error_share_past_the_threshold_stops_the_run():
    good = [make_record(i, "fine", "ok") for i in range(9)]
    bad = convo(("user", "hi"), ("assistant", "a"), ("assistant", "b"))
    bad["id"] = "bad"
    errors, _, report = preflight(good + [bad], PreflightConfig(max_error_share=0.1, count_tokens=False), None, 512)
    assert errors == {"bad": "consecutive_assistant_turns"} and report["error_share"] == pytest.approx(0.1)
    with pytest.raises(PreflightError, match=r"18.2% of 11 input records are invalid.*max_error_share"):
        preflight(good + [bad], PreflightConfig(max_error_share=0.1), None, 512,
                  load_rejects=[{"file": "f.jsonl", "index": 99, "reason": "invalid JSON: Expecting value"}])


def test_error_lists_the_first_20_offending_lines_and_totals_by_reason():
    good = [make_record(i, "fine", "ok") for i in range(10)]
    bad = convo(("user", "hi"), ("assistant", "a"), ("assistant", "b"))
    bad.update(id="bad", file="f.jsonl", index=7)
    unreadable = [{"file": "f.jsonl", "index": i, "reason": "invalid JSON: Expecting value (column 1)"}
                  for i in range(100, 125)]
    unreadable.append({"file": "f.jsonl", "index": 3, "reason": "not UTF-8: byte 0xff at column 9"})
    with pytest.raises(PreflightError) as info:
        preflight(good + [bad], PreflightConfig(count_tokens=False), None, 512, load_rejects=unreadable)
    msg = str(info.value)
    assert "totals by reason: invalid JSON 25, not UTF-8 1, preflight:consecutive_assistant_turns 1" in msg
    listed = msg.split("first 20 of 27:\n")[1].splitlines()
    assert len(listed) == 20 and listed[0] == "  f.jsonl:3: not UTF-8: byte 0xff at column 9"
    assert listed[1] == "  f.jsonl:7: preflight:consecutive_assistant_turns"
    assert listed[2].startswith("  f.jsonl:100: invalid JSON")
