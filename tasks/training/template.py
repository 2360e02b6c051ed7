"""Stage 4: render conversations with a chat template, mark the tokens to train on, audit the masks.

The template is the tokenizer's own, or a custom Jinja file (`configs/templates/<name>.jinja` or a path).
transformers renders every chat template in jinja2's ImmutableSandboxedEnvironment, so a template file
cannot reach Python internals. The chosen template is saved with the tokenizer in this stage's output;
the train stage saves that tokenizer next to the adapter/model, so evaluation generates with it.

Masks: a template with `{% generation %}` markers is masked exactly as TRL's `assistant_only_loss` would
(`return_assistant_tokens_mask`); one without markers is masked by prefix rendering (the text rendered up
to an assistant turn with the generation prompt is its prefix; the text through the turn ends it).

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
from sftflow.errors import UserError
from sftflow.models import load_tokenizer
from sftflow.records import read_jsonl, reject, write_jsonl
from sftflow.results import Tokens
from sftflow.tracking import stage

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(UserError, ValueError):
    pass


def shipped_templates() -> dict[str, str]:
    """{name: jinja text} of the templates in configs/templates/."""
    folder = resources.files("sftflow.configs").joinpath("templates")
    return {p.name.removesuffix(".jinja"): p.read_text().strip() for p in folder.iterdir()
            if p.name.endswith(".jinja")}


def load_chat_template(spec: str) -> str:
    """A shipped template name or a path to a .jinja file -> its text."""
    shipped = shipped_templates()
    if spec in shipped:
        return shipped[spec]
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
    """{"input_ids", "assistant_masks", "audit": per-record mask audit counts}."""
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_turn = [next((k for k, (a, b) in enumerate(spans) if s < b and e > a), None) for s, e in offsets]
    if GENERATION_MARKER.search(tok.chat_template or ""):
        marked = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
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


@stage("template")
def template(split_paths: dict, model_path: str, cfg: TemplateConfig, out_dir: Path,
             trust_remote_code: bool = False) -> Tokens:
    tok = apply_template(load_tokenizer(model_path, trust_remote_code), cfg, model_path)
    metrics, paths, rejects, samples = {}, {}, [], []
    for name in ("train", "val"):
        kept, audits = [], []
        for record in read_jsonl(Path(split_paths[name])):
            row = tokenize(tok, with_system(record["messages"], cfg.system_prompt))
            n = len(row["input_ids"])
            if n > cfg.max_length:
                rejects.append(reject(record, "template", f"exceeds_max_length ({n} > {cfg.max_length} tokens)"))
                continue
            kept.append((record, row))
            audits.append(row["audit"])
        split_metrics = audit_metrics(audits)
        check_audit(split_metrics, f"{name} split of {split_paths[name]}")
        # A record whose mask is empty (while others train) teaches nothing: rejected, with its reason.
        rejects += [reject(rec, "template", "no_trained_token") for rec, row in kept if not row["audit"]["trained"]]
        rows = [{"id": rec["id"], "input_ids": row["input_ids"], "assistant_masks": row["assistant_masks"]}
                for rec, row in kept if row["audit"]["trained"]]
        paths[name] = str(out_dir / f"{name}.tokens.jsonl")
        write_jsonl(out_dir / f"{name}.tokens.jsonl", rows)
        if name == "train":
            picked = random.Random(0).sample(rows, min(cfg.audit_samples, len(rows)))
            samples = [render_masked(tok, r) for r in picked]
        split_metrics["records"] = len(rows)
        metrics.update({f"template/{name}/{k}": v for k, v in split_metrics.items()})
    if not metrics["template/train/records"]:
        raise TemplateError(f"no train record fits max_length={cfg.max_length}; raise template.max_length")
    metrics["template/rejected"] = len(rejects)
    write_jsonl(out_dir / "template_rejects.jsonl", rejects)
    table = "\n".join(f"| {k.removeprefix('template/')} | {v:.4g} |" for k, v in metrics.items())
    (out_dir / "masked_samples.md").write_text(
        "# Loss-mask audit\n\n| metric | value |\n|---|---|\n" + table +
        f"\n\n## {len(samples)} sampled train records (trained tokens in [[...]])\n\n" +
        "\n\n---\n\n".join(f"```\n{s}\n```" for s in samples) + "\n")
    tok.save_pretrained(out_dir / "tokenizer")  # with the chat template: training and evaluation use it
    paths["tokenizer"] = str(out_dir / "tokenizer")
    info = {"chat_template": cfg.chat_template or "tokenizer", "chat_template_sha256": template_hash(tok),
            "has_generation_markers": bool(GENERATION_MARKER.search(tok.chat_template)),
            "system_prompt": cfg.system_prompt}
    (out_dir / "template.json").write_text(json.dumps(info, indent=2))
    params = {f"template.{k}": v for k, v in info.items() if k != "system_prompt"}
    return {"paths": paths, "metrics": metrics, "params": params,
            "artifacts": [out_dir / "masked_samples.md", out_dir / "template.json", out_dir / "template_rejects.jsonl"]}
