"""Turns beyond plain text: tool calls, tool results and reasoning, read into one canonical shape and checked.

Canonical turn: `{"role", "content"}` plus, on an assistant turn, `tool_calls` (`[{"type": "function",
"function": {"name", "arguments"}}]`, arguments as given: a JSON object or its text) and `reasoning_content`;
a `tool` turn may carry `name` and `tool_call_id`. A record's `tools` is a list of function schemas
(`{"type": "function", "function": {"name", ...}}`). A think block opening an assistant turn
(`<think>...</think>`) becomes its `reasoning_content`, so every template gets reasoning the same way.
Arguments are kept as given so that pre-flight can reject text that is not JSON with the record's file:line.
"""

from __future__ import annotations

import json
import re

from sftflow.records import ROLES

THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
# ShareGPT speakers of function-calling datasets (LLaMA-Factory's function_call/observation and their kin).
CALL_SPEAKERS = {"function_call", "tool_call", "tool_calls"}
RESULT_SPEAKERS = {"observation", "tool", "function_response", "tool_response", "ipython"}


class ShapeError(ValueError):
    """A turn that reads but has no canonical shape; the message is the reject reason (`kind: detail`)."""


def text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ShapeError(f"wrong schema: {what} must be text, not {type(value).__name__}")
    return value


def _json(value: object, what: str) -> object:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise ShapeError(f"wrong schema: {what} holds text that is not JSON") from None


def _call(raw: object, where: str) -> dict:
    fn = raw.get("function", raw) if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ShapeError(f"wrong schema: {where} is not a call with a function name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if not isinstance(args, (str, dict)):
        raise ShapeError(f"wrong schema: {where} arguments must be a JSON object or its text")
    call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(raw.get("id"), str):
        call["id"] = raw["id"]
    return call


def calls(value: object, where: str) -> list[dict]:
    value = _json(value, where)
    value = value if isinstance(value, list) else [value]
    if not value:
        raise ShapeError(f"wrong schema: {where} is an empty list")
    return [_call(c, f"{where}[{i}]") for i, c in enumerate(value)]


def tools(value: object) -> list[dict]:
    """A row's `tools` (a list, or its JSON text as in LLaMA-Factory) -> function schemas."""
    value = _json(value, "'tools'")
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        raise ShapeError("wrong schema: 'tools' must be a list of function schemas")
    out = []
    for i, t in enumerate(value):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ShapeError(f"wrong schema: tools[{i}] is not a function schema with a name")
        out.append({"type": "function", "function": fn})
    return out


def turn(role: object, content: object, where: str, extra: dict | None = None) -> dict:
    """One canonical turn; `extra` holds the raw turn's other fields (tool_calls, reasoning_content, ...)."""
    extra = extra or {}
    if not isinstance(role, str) or role not in ROLES:
        raise ShapeError(f"unknown role: {where} has role {role!r}, expected one of {', '.join(ROLES)}")
    has_calls = extra.get("tool_calls") not in (None, [])
    out = {"role": role, "content": "" if content is None and has_calls else text(content, f"{where} content")}
    if has_calls:
        if role != "assistant":
            raise ShapeError(f"wrong schema: {where} has tool_calls but role {role!r}")
        out["tool_calls"] = calls(extra["tool_calls"], f"{where} tool_calls")
    reasoning = extra.get("reasoning_content", extra.get("reasoning"))
    if reasoning is not None:  # kept on any role: pre-flight rejects it off an assistant turn
        out["reasoning_content"] = text(reasoning, f"{where} reasoning_content")
    elif role == "assistant" and (m := THINK.match(out["content"])):
        out["reasoning_content"], out["content"] = m.group(1).strip("\n"), out["content"][m.end():]
    if role == "tool":
        out.update({k: extra[k] for k in ("name", "tool_call_id") if isinstance(extra.get(k), str)})
    return out


def sharegpt_turns(turns: list, roles: dict[str, str]) -> list[dict]:
    """ShareGPT turns -> canonical ones; a call speaker joins the assistant text just before it."""
    out: list[dict] = []
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise ShapeError(f"wrong schema: {where} is not an object")
        speaker = t.get("from", "")
        key = speaker.lower() if isinstance(speaker, str) else ""
        if key in CALL_SPEAKERS:
            found = calls(t.get("value"), f"{where} value")
            if out and out[-1]["role"] == "assistant" and "tool_calls" not in out[-1]:
                out[-1]["tool_calls"] = found
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": found})
        elif key in RESULT_SPEAKERS:
            out.append(turn("tool", t.get("value"), where))
        else:
            out.append(turn(roles.get(key, speaker), t.get("value"), where, t))
    return out


# --- pre-flight rules of tool calls and reasoning: (rule, check) -> True when the record breaks the rule ---

def _call_args_ok(call: dict) -> bool:
    args = call["function"]["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return False
    return isinstance(args, dict)


def _unanswered_and_orphans(messages: list[dict]) -> tuple[int, int]:
    """(calls with no tool result before the next non-tool turn, tool results with no call to answer)."""
    unanswered = orphans = 0
    open_calls: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            ids, answers = [c.get("id") for c in open_calls], m.get("tool_call_id")
            if not open_calls:
                orphans += 1
            else:  # the call it names, else the first still open
                open_calls.pop(ids.index(answers) if answers is not None and answers in ids else 0)
            continue
        unanswered += len(open_calls)
        open_calls = list(m.get("tool_calls") or [])
    return unanswered + len(open_calls), orphans


def _known(record: dict) -> set[str]:
    return {t["function"]["name"] for t in record.get("tools") or []}


TOOL_RULES = {
    "reasoning_on_non_assistant_turn": lambda r: any("reasoning_content" in m and m["role"] != "assistant"
                                                     for m in r["messages"]),
    "tool_result_without_call": lambda r: _unanswered_and_orphans(r["messages"])[1] > 0,
    "tool_call_without_result": lambda r: _unanswered_and_orphans(r["messages"])[0] > 0,
    "invalid_tool_arguments": lambda r: any(not _call_args_ok(c) for m in r["messages"]
                                            for c in m.get("tool_calls") or []),
    "unknown_function": lambda r: any(c["function"]["name"] not in _known(r) for m in r["messages"]
                                      for c in m.get("tool_calls") or []),
}


def uses_tools(record: dict) -> bool:
    return bool(record.get("tools")) or any(m["role"] == "tool" or m.get("tool_calls") for m in record["messages"])
