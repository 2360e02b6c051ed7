"""The chat templates TRL ships, each around the tiny test tokenizer (no hub: they are in the installed package)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

# Templates of vision processors: they index every turn's content as a list of parts, which text records are not.
PROCESSOR_ONLY = {"idefics3", "llava_next", "smolvlm"}
_TAG = re.compile(r"<\|[^<>|]{1,40}\|>|<｜[^<>｜]{1,40}｜>|<[A-Za-z_|]{2,30}\|?>|<\|?[A-Za-z_]{2,30}>")
PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "PROBE"},
         {"role": "user", "content": "hi"}, {"role": "assistant", "content": "PROBE"}]


def trl_templates(training: bool | None = None) -> dict[str, str]:
    """{name: text} of TRL's shipped templates; training=False: the originals, True: their twins, None: all."""
    folder = resources.files("trl").joinpath("chat_templates")
    out = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        name = p.name.removesuffix(".jinja")
        if not p.name.endswith(".jinja") or name.removesuffix("_training") in PROCESSOR_ONLY:
            continue
        if training is None or name.endswith("_training") == training:
            out[name] = p.read_text(encoding="utf-8")
    return out


def end_of_turn(tok) -> str:
    """The first special tag after an assistant turn's text in a rendered conversation: the turn's end."""
    text = tok.apply_chat_template(PROBE, tokenize=False)
    return _TAG.search(text, text.index("PROBE") + len("PROBE")).group(0)


def tokenizer_for(tiny_model: str, chat_template: str):
    """The tiny tokenizer with `chat_template`, the template's tags as special tokens, eos its end of turn."""
    from sftflow.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    tok.chat_template = chat_template
    tags = sorted({t for t in _TAG.findall(chat_template) if t not in ("<think>", "</think>")})
    tok.add_special_tokens({"additional_special_tokens": tags})
    tok.eos_token = end_of_turn(tok)
    return tok


def saved_tokenizer(tiny_model: str, chat_template: str, dest: Path) -> str:
    """A tokenizer folder (what the template stage loads) around `chat_template`."""
    tokenizer_for(tiny_model, chat_template).save_pretrained(dest)
    return str(dest)


def trained_text(tok, row: dict) -> str:
    return "".join(tok.decode([t]) for t, m in zip(row["input_ids"], row["assistant_masks"]) if m)


def trained_runs(tok, row: dict) -> list[str]:
    """The trained text, one string per run of consecutive trained tokens."""
    runs, current = [], []
    for t, m in zip(row["input_ids"], row["assistant_masks"]):
        if m:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])
