"""GSM8K as calculator-tool conversations: each `<<expression=result>>` annotation of a worked answer becomes an
assistant call of `calculator` and its tool result; the final turn is the worked answer without annotations."""

from __future__ import annotations

import re

from sftflow.tasks.data.shapes import text

CALCULATION = re.compile(r"<<([^=<>]+)=([^<>]*)>>")
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression and return its value.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "e.g. 48/2"}},
                   "required": ["expression"]}}}


def calculator_conversation(row: dict) -> tuple[list[dict], object]:
    question, answer = text(row["question"], "'question'"), text(row["answer"], "'answer'")
    messages = [{"role": "user", "content": question}]
    for expression, result in CALCULATION.findall(answer):
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "calculator", "content": result}]
    return [*messages, {"role": "assistant", "content": CALCULATION.sub("", answer)}], row.get("label")
