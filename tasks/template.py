"""Stage 4: render conversations with the chat template and mark the tokens to train on.

Assistant spans come from the template itself: for each assistant turn, the text rendered up to
that turn with the generation prompt is the prefix, the text rendered through the turn ends it.
This works for any prefix-stable template, needs no `{% generation %}` markers, and trains the
end-of-turn token. Records longer than max_length are rejected (counted), never truncated silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sftflow.configs.schema import TemplateConfig
from sftflow.models import load_tokenizer
from sftflow.records import read_jsonl, reject, write_jsonl
from sftflow.tracking import stage_task


class TemplateError(ValueError):
    pass


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tok, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character span of each assistant turn incl. its end-of-turn token])."""
    text = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, messages[:i], add_generation_prompt=True)
        through = render(tok, messages[: i + 1])
        if not (through.startswith(prefix) and text.startswith(through)):
            raise TemplateError(
                f"chat template is not prefix-stable at turn {i}: rendering a conversation's first turns "
                "does not yield a prefix of the whole; assistant tokens cannot be located")
        spans.append((len(prefix), len(through.rstrip())))
    return text, spans


def tokenize(tok, messages: list[dict]) -> dict:
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < e_span and e > s_span for s_span, e_span in spans)) for s, e in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def render_masked(tok, row: dict) -> str:
    """Readable rendering: trained tokens inside [[...]]."""
    out, inside = [], False
    for tid, m in zip(row["input_ids"], row["assistant_masks"]):
        if m and not inside:
            out.append("[[")
        if not m and inside:
            out.append("]]")
        inside = bool(m)
        out.append(tok.decode([tid]))
    return "".join(out) + ("]]" if inside else "")


def template_hash(tok) -> str:
    return hashlib.sha256((tok.chat_template or "").encode()).hexdigest()


def template(split_paths: dict, model_path: str, cfg: TemplateConfig, out_dir: Path,
             trust_remote_code: bool = False) -> dict:
    tok = load_tokenizer(model_path, trust_remote_code)
    if not tok.chat_template:
        raise TemplateError(f"the tokenizer at {model_path} has no chat template")
    eos = tok.eos_token_id
    metrics, paths, rejects, samples = {}, {}, [], []
    for name in ("train", "val"):
        rows, tokens, trained, eos_trained = [], 0, 0, 0
        for record in read_jsonl(Path(split_paths[name])):
            row = tokenize(tok, with_system(record["messages"], cfg.system_prompt))
            n = len(row["input_ids"])
            if n > cfg.max_length:
                rejects.append(reject(record, "template", f"exceeds_max_length ({n} > {cfg.max_length} tokens)"))
                continue
            if not any(row["assistant_masks"]):
                rejects.append(reject(record, "template", "no_trained_token"))
                continue
            rows.append({"id": record["id"], **row})
            tokens += n
            trained += sum(row["assistant_masks"])
            eos_trained += any(t == eos and m for t, m in zip(row["input_ids"], row["assistant_masks"]))
        if name == "train" and rows and not eos_trained:
            raise TemplateError("no training record trains the end-of-turn token: the model would never learn "
                                "to stop. Check the chat template's end-of-turn and the tokenizer's eos_token.")
        paths[name] = str(out_dir / f"{name}.tokens.jsonl")
        write_jsonl(out_dir / f"{name}.tokens.jsonl", rows)
        samples += [render_masked(tok, r) for r in rows[:3]] if name == "train" else []
        metrics.update({f"template/{name}/records": len(rows), f"template/{name}/tokens": tokens,
                        f"template/{name}/trained_tokens": trained,
                        f"template/{name}/trained_share": trained / tokens if tokens else 0.0,
                        f"template/{name}/eos_trained_share": eos_trained / len(rows) if rows else 0.0})
    if not metrics["template/train/records"]:
        raise TemplateError(f"no train record fits max_length={cfg.max_length}; raise template.max_length")
    metrics["template/rejected"] = len(rejects)
    write_jsonl(out_dir / "template_rejects.jsonl", rejects)
    (out_dir / "masked_samples.md").write_text(
        "# Masked samples (trained tokens in [[...]])\n\n" + "\n\n---\n\n".join(f"```\n{s}\n```" for s in samples))
    info = {"chat_template_sha256": template_hash(tok), "system_prompt": cfg.system_prompt}
    (out_dir / "template.json").write_text(json.dumps(info, indent=2))
    return {"paths": paths, "metrics": metrics, "params": {"template.chat_template_sha256": info["chat_template_sha256"]},
            "artifacts": [out_dir / "masked_samples.md", out_dir / "template.json", out_dir / "template_rejects.jsonl"]}


template_task = stage_task(template, "template")
