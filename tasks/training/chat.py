"""What a chat template is given, and where the assistant-only mask comes from.

Mask source, first that applies: the template's own `{% generation %}` markers (`markers`); the training
twin TRL ships for a template it knows (`trl_twin`: TRL's `get_training_chat_template`, which recognises
the templates of Qwen3, DeepSeek, Nemotron 3, Phi-3 and others by their exact text and returns a
prefix-preserving copy with markers); prefix rendering (`prefix`), which fails closed on a template that is
not prefix-stable. The twin renders training records only; the tokenizer keeps its own template for
generation.

Reasoning (`template.reasoning`): `keep` passes `reasoning_content` to a template that reads it (Qwen3,
Nemotron) and otherwise writes it as a think block opening the turn (DeepSeek-R1); `strip` drops it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from importlib import resources

import jinja2

from sftflow.errors import UserError
from sftflow.tasks.data.shapes import uses_tools

MARKERS, TWIN, PREFIX = "markers", "trl_twin", "prefix"


class TemplateError(UserError, ValueError):
    pass


def has_markers(chat_template: str | None) -> bool:
    from trl.chat_template_utils import has_generation_markers

    return bool(chat_template) and has_generation_markers(chat_template)


def trl_template_name(chat_template: str) -> str | None:
    """The name of the TRL-shipped template whose text this is (`qwen3`, `phi3`, ...), else None."""
    folder = resources.files("trl").joinpath("chat_templates")
    return next((p.name.removesuffix(".jinja") for p in sorted(folder.iterdir(), key=lambda p: p.name)
                 if p.name.endswith(".jinja") and p.read_text(encoding="utf-8") == chat_template), None)


def training_template(tok) -> tuple[str, str]:
    """(mask source, the template training records are rendered with)."""
    own = tok.chat_template
    if has_markers(own):
        return MARKERS, own
    from trl.chat_template_utils import get_training_chat_template

    try:
        twin = get_training_chat_template(tok)
    except (ValueError, TypeError, jinja2.TemplateError):  # a template TRL has no twin for, or cannot probe
        twin = None
    return (TWIN, twin) if twin else (PREFIX, own)


@contextmanager
def rendering_with(tok, chat_template: str):
    """The tokenizer renders with `chat_template` inside the block, its own template after it."""
    own = tok.chat_template
    tok.chat_template = chat_template
    try:
        yield tok
    finally:
        tok.chat_template = own


def supports_tools(tok, chat_template: str) -> bool:
    """Whether the template renders a call's name and arguments and the tool's result (TRL's own probe)."""
    from trl.chat_template_utils import supports_tool_calling

    with rendering_with(tok, chat_template):
        return supports_tool_calling(tok)


def check_tool_support(tok, chat_template: str, records: list[dict], name: str) -> None:
    users = [r for r in records if uses_tools(r)]
    if users and not supports_tools(tok, chat_template):
        first = users[0]
        raise TemplateError(
            f"chat template {name} has no tool-calling support (it drops the calls or the tool results), but "
            f"{len(users)} record(s) use tools, first {first.get('file')}:{first.get('index')}; set "
            "template.chat_template to a template that renders `tools`, `tool_calls` and `tool` turns")


def _arguments_as_objects(call: dict) -> dict:
    args = call["function"]["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass  # pre-flight rejects such records; render what was given
    return {**call, "function": {**call["function"], "arguments": args}}


def chat_messages(messages: list[dict], reasoning: str, chat_template: str | None) -> list[dict]:
    """Canonical turns -> what apply_chat_template takes: arguments as objects, reasoning kept or stripped."""
    reads_reasoning = "reasoning_content" in (chat_template or "")
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [_arguments_as_objects(c) for c in m["tool_calls"]]
        thought = m.pop("reasoning_content", None)
        if thought is not None and reasoning == "keep" and m["role"] == "assistant":
            if reads_reasoning:
                m["reasoning_content"] = thought
            else:
                m["content"] = f"<think>\n{thought}\n</think>\n\n{m['content']}"
        out.append(m)
    return out


def arguments_as_text(messages: list[dict]) -> list[dict]:
    """The same turns with arguments as JSON text, for templates that concatenate them (DeepSeek)."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False) if not isinstance(c["function"]["arguments"], str)
        else c["function"]["arguments"]}} for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in messages]
