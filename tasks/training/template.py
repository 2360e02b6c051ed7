"""Stage 4: render conversations with a chat template, mark the tokens to train on, audit the masks.

The template is the tokenizer's own, or a custom Jinja file (`configs/templates/<name>.jinja` or a path).
transformers renders every chat template in jinja2's ImmutableSandboxedEnvironment, so a template file
cannot reach Python internals. The chosen template is saved with the tokenizer in this stage's output;
the train stage saves that tokenizer next to the adapter/model, so evaluation generates with it.

Masks (chat.py picks the source): a template with `{% generation %}` markers, or TRL's training twin of
a template TRL knows, is masked exactly as TRL's `assistant_only_loss` would (`return_assistant_tokens_mask`);
any other by prefix rendering (the text rendered up to an assistant turn with the generation prompt is its
prefix; the text through the turn ends it). Records with tools render through the template's `tools`
argument; a template that drops calls or results is refused before any record is rendered.

The audit re-derives every assistant turn by prefix rendering, independently of the mask, and measures
on every record: the share of tokens trained, whether each assistant turn's end-of-turn (eos) token is
trained, and whether prompt tokens are trained. A mask that trains nothing, trains the whole prompt, or
never trains eos fails the run before training starts. Records longer than max_length are rejected
(counted), never truncated silently.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from importlib import resources
from pathlib import Path

from sftflow.configs.schema import TemplateConfig
from sftflow.models import load_tokenizer
from sftflow.records import read_jsonl, reject, write_jsonl
from sftflow.results import Tokens
from sftflow.tasks.data.shapes import uses_tools
from sftflow.tasks.training.chat import (
    PREFIX,
    TemplateError,
    arguments_as_text,
    chat_messages,
    check_tool_support,
    rendering_with,
    training_template,
    trl_template_name,
)
from sftflow.tracking import stage

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
MASK_SOURCES = {"markers": "the template's own {% generation %} markers",
                "trl_twin": "the training twin TRL ships for this template",
                PREFIX: "prefix rendering of each assistant turn"}


def shipped_templates() -> dict[str, str]:
    """{name: jinja text} of the templates in configs/templates/."""
    folder = resources.files("sftflow.configs").joinpath("templates")
    return {p.name.removesuffix(".jinja"): p.read_text().strip() for p in folder.iterdir()
            if p.name.endswith(".jinja")}


def load_chat_template(spec: str) -> str:
    """A shipped template name, `trl:<name>` (a template the installed TRL ships) or a .jinja path -> its text."""
    shipped = shipped_templates()
    if spec in shipped:
        return shipped[spec]
    if spec.startswith("trl:"):
        path = resources.files("trl").joinpath("chat_templates", spec.removeprefix("trl:") + ".jinja")
        if path.is_file():
            return path.read_text(encoding="utf-8")
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text().strip()
    raise TemplateError(f"template.chat_template {spec!r} is neither a shipped template "
                        f"({', '.join(sorted(shipped))}) nor a file")


def apply_template(tok, cfg: TemplateConfig, model_path: str):
    """Set the configured chat template on `tok` (or check the tokenizer has one); returns tok."""
    if cfg.chat_template:
        tok.chat_template = load_chat_template(cfg.chat_template)
    if not tok.chat_template:
        raise TemplateError(f"the tokenizer at {model_path} has no chat template: set template.chat_template "
                            f"to one of {', '.join(sorted(shipped_templates()))} or a .jinja file")
    return tok


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tok, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
           **kw):
    try:
        return tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kw)
    except TypeError:  # a template that concatenates arguments as text (DeepSeek's)
        return tok.apply_chat_template(arguments_as_text(messages), tools=tools or None, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kw)


def _common(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assistant_spans(tok, messages: list[dict], tools: list | None = None,
                    strict: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character span of each assistant turn incl. its end-of-turn token]).

    `strict`: each turn's prefix and the text through it must be prefixes of the whole (the mask comes from
    them). Otherwise (an audit of a marker mask) a turn spans from where its prefix and the whole part to
    where the text through it and the whole part: a twin may close the last turn or open the next prompt
    differently."""
    text = render(tok, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, messages[:i], add_generation_prompt=True, tools=tools)
        through = render(tok, messages[: i + 1], tools=tools)
        if strict and not (through.startswith(prefix) and text.startswith(through)):
            raise TemplateError(
                f"chat template is not prefix-stable at turn {i}: rendering a conversation's first turns "
                "does not yield a prefix of the whole; assistant tokens cannot be located")
        start, end = _common(prefix, text), _common(through.rstrip(), text)
        spans.append((start, max(start, end)))
    return text, spans


def tokenize(tok, messages: list[dict], tools: list | None = None) -> dict:
    """{"input_ids", "assistant_masks", "audit": per-record mask audit counts}."""
    marked_template = bool(GENERATION_MARKER.search(tok.chat_template or ""))
    text, spans = assistant_spans(tok, messages, tools, strict=not marked_template)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_turn = [next((k for k, (a, b) in enumerate(spans) if s < b and e > a), None) for s, e in offsets]
    if marked_template:
        try:
            marked = tok.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
        except TypeError:
            marked = tok.apply_chat_template(arguments_as_text(messages), tools=tools or None, tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
        if list(marked["input_ids"]) != list(ids):
            raise TemplateError("the chat template tokenizes differently with and without generation tracking")
        mask = [int(bool(m)) for m in marked["assistant_masks"]]
    else:
        mask = [int(k is not None) for k in in_turn]
    eos = tok.eos_token_id
    eos_turns = {k for tid, m, k in zip(ids, mask, in_turn) if m and tid == eos and k is not None}
    audit = {"tokens": len(ids), "trained": sum(mask), "turns": len(spans), "eos_trained_turns": len(eos_turns),
             "prompt_tokens": sum(k is None for k in in_turn),
             "prompt_trained": sum(1 for m, k in zip(mask, in_turn) if m and k is None)}
    return {"input_ids": ids, "assistant_masks": mask, "audit": audit}


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


def audit_metrics(audits: list[dict]) -> dict[str, float]:
    """Split-level mask audit from the per-record counts."""
    total = {k: sum(a[k] for a in audits) for k in ("tokens", "trained", "turns", "eos_trained_turns",
                                                    "prompt_tokens", "prompt_trained")}
    n = len(audits) or 1
    return {"records": len(audits), "tokens": total["tokens"], "trained_tokens": total["trained"],
            "trained_share": total["trained"] / total["tokens"] if total["tokens"] else 0.0,
            "assistant_turns": total["turns"],
            "eos_trained_share": total["eos_trained_turns"] / total["turns"] if total["turns"] else 0.0,
            "prompt_tokens": total["prompt_tokens"], "prompt_tokens_trained": total["prompt_trained"],
            "records_with_prompt_trained_share": sum(a["prompt_trained"] > 0 for a in audits) / n}


def check_audit(m: dict, where: str) -> None:
    """Fail before training on a mask that trains nothing, trains everything, or never trains eos."""
    hint = "Check the chat template's {% generation %} markers and end-of-turn token, and the tokenizer's eos_token."
    if m["records"] and not m["trained_tokens"]:
        raise TemplateError(f"mask audit ({where}): no token of any record is trained. {hint}")
    if m["prompt_tokens"] and m["prompt_tokens_trained"] == m["prompt_tokens"]:
        raise TemplateError(f"mask audit ({where}): every token is trained, prompts included; "
                            f"assistant-only loss is not in effect. {hint}")
    if m["assistant_turns"] and not m["eos_trained_share"]:
        raise TemplateError(f"mask audit ({where}): no assistant turn trains the end-of-turn token: the model "
                            f"would never learn to stop. {hint}")


def template_name(cfg: TemplateConfig, tok, model_path: str) -> str:
    """How messages name the template: the configured one, TRL's name for a template it ships, or the model's."""
    known = trl_template_name(tok.chat_template)
    return repr(cfg.chat_template) if cfg.chat_template else f"{known!r} (from {model_path})" if known \
        else f"of the tokenizer at {model_path}"


def _tokenize_split(tok, records: list[dict], cfg: TemplateConfig, rejects: list[dict]) -> tuple[list, list]:
    """-> ([(record, row)] that fit max_length, their audits); overlong records go to `rejects`."""
    kept, audits = [], []
    for record in records:
        messages = chat_messages(with_system(record["messages"], cfg.system_prompt), cfg.reasoning, tok.chat_template)
        row = tokenize(tok, messages, record.get("tools"))
        n = len(row["input_ids"])
        if n > cfg.max_length:
            rejects.append(reject(record, "template", f"exceeds_max_length ({n} > {cfg.max_length} tokens)"))
            continue
        kept.append((record, row))
        audits.append(row["audit"])
    return kept, audits


@stage("template")
def template(split_paths: dict, model_path: str, cfg: TemplateConfig, out_dir: Path,
             trust_remote_code: bool = False) -> Tokens:
    tok = apply_template(load_tokenizer(model_path, trust_remote_code), cfg, model_path)
    source, training = training_template(tok)
    name = template_name(cfg, tok, model_path)
    splits = {s: list(read_jsonl(Path(split_paths[s]))) for s in ("train", "val")}
    check_tool_support(tok, training, splits["train"] + splits["val"], name)
    metrics, paths, rejects, samples = {}, {}, [], []
    with rendering_with(tok, training):  # the twin renders training records; the tokenizer keeps its own
        for split in ("train", "val"):
            kept, audits = _tokenize_split(tok, splits[split], cfg, rejects)
            split_metrics = audit_metrics(audits)
            check_audit(split_metrics, f"{split} split of {split_paths[split]}")
            # A record whose mask is empty (while others train) teaches nothing: rejected, with its reason.
            rejects += [reject(rec, "template", "no_trained_token") for rec, row in kept if not row["audit"]["trained"]]
            rows = [{"id": rec["id"], "input_ids": row["input_ids"], "assistant_masks": row["assistant_masks"]}
                    for rec, row in kept if row["audit"]["trained"]]
            paths[split] = str(out_dir / f"{split}.tokens.jsonl")
            write_jsonl(out_dir / f"{split}.tokens.jsonl", rows)
            if split == "train":
                picked = random.Random(0).sample(rows, min(cfg.audit_samples, len(rows)))
                samples = [render_masked(tok, r) for r in picked]
            split_metrics["records"] = len(rows)
            metrics.update({f"template/{split}/{k}": v for k, v in split_metrics.items()})
    if not metrics["template/train/records"]:
        raise TemplateError(f"no train record fits max_length={cfg.max_length}; raise template.max_length")
    metrics["template/rejected"] = len(rejects)
    metrics["template/tool_records"] = sum(uses_tools(r) for r in splits["train"] + splits["val"])
    write_jsonl(out_dir / "template_rejects.jsonl", rejects)
    info = {"chat_template": cfg.chat_template or "tokenizer", "chat_template_sha256": template_hash(tok),
            "has_generation_markers": bool(GENERATION_MARKER.search(tok.chat_template)),
            "mask_source": source, "trl_template": trl_template_name(tok.chat_template) or "",
            "training_template_sha256": hashlib.sha256(training.encode()).hexdigest(),
            "reasoning": cfg.reasoning, "system_prompt": cfg.system_prompt}
    table = "\n".join(f"| {k.removeprefix('template/')} | {v:.4g} |" for k, v in metrics.items())
    (out_dir / "masked_samples.md").write_text(
        f"# Loss-mask audit\n\nMask source: **{source}** ({MASK_SOURCES[source]}); template {name}; "
        f"reasoning: {cfg.reasoning}.\n\n| metric | value |\n|---|---|\n" + table +
        f"\n\n## {len(samples)} sampled train records (trained tokens in [[...]])\n\n" +
        "\n\n---\n\n".join(f"```\n{s}\n```" for s in samples) + "\n")
    tok.save_pretrained(out_dir / "tokenizer")  # with its own chat template: training and evaluation use it
    paths["tokenizer"] = str(out_dir / "tokenizer")
    (out_dir / "template.json").write_text(json.dumps(info, indent=2))
    params = {f"template.{k}": v for k, v in info.items() if k != "system_prompt"}
    return {"paths": paths, "metrics": metrics, "params": params,
            "artifacts": [out_dir / "masked_samples.md", out_dir / "template.json", out_dir / "template_rejects.jsonl"]}
