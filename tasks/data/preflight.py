"""Pre-flight check of loaded records, in the spirit of OpenAI's fine-tuning file check.

Structure (known roles; every tool call answered by a result, with JSON arguments, of a function in the
record's `tools`, and no result without a call; reasoning only on assistant turns; system first, user
before assistant, no two assistant turns in a row, a final assistant turn, no empty turn) and token
counts with the real tokenizer and chat template: how many tokens a run trains on and what share
`max_length` would cut. Invalid records are rejected with the rule; when their share (load rejects
included) passes `max_error_share` the run stops here, before any training time is spent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sftflow.configs.schema import PreflightConfig
from sftflow.records import ROLES
from sftflow.tasks.data.readers import DataError
from sftflow.tasks.data.shapes import TOOL_RULES


def _roles(r: dict) -> list[str]:
    return [m["role"] for m in r["messages"]]


def _empty(m: dict) -> bool:
    """A turn that says nothing: no text, no call and no reasoning."""
    return not (m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content", "").strip())


STRUCTURE: dict[str, Callable[[dict], bool]] = {
    "no_messages": lambda r: not r["messages"],
    "unknown_role": lambda r: any(x not in ROLES for x in _roles(r)),
    **TOOL_RULES,
    "system_not_first": lambda r: "system" in _roles(r)[1:],
    "empty_turn": lambda r: any(_empty(m) for m in r["messages"]),
    "no_assistant_turn": lambda r: "assistant" not in _roles(r),
    "assistant_before_user": lambda r: [x for x in _roles(r) if x != "system"][0] != "user",
    "consecutive_assistant_turns": lambda r: any(a == b == "assistant" for a, b in zip(_roles(r), _roles(r)[1:])),
    "no_final_assistant_turn": lambda r: _roles(r)[-1] != "assistant",
}


class PreflightError(DataError):
    """Too large a share of the input is invalid to be worth a training run."""


def structure_error(record: dict) -> str | None:
    return next((name for name, bad in STRUCTURE.items() if bad(record)), None)


def token_counts(records: list[dict], tokenizer_path: str, system_prompt: str | None) -> list[int | None]:
    """Templated token count per record (None where the chat template refuses the conversation)."""
    from sftflow.models import load_tokenizer
    from sftflow.tasks.training.chat import chat_messages
    from sftflow.tasks.training.template import render, with_system

    tok = load_tokenizer(tokenizer_path)
    texts: list[str | None] = []
    for r in records:
        try:
            msgs = chat_messages(with_system(r["messages"], system_prompt), "keep", tok.chat_template)
            texts.append(render(tok, msgs, tools=r.get("tools")))
        except Exception:  # jinja's raise_exception in a template: the template's own validation
            texts.append(None)
    ok = [t for t in texts if t is not None]
    lengths = iter([len(ids) for lo in range(0, len(ok), 512)
                    for ids in tok(ok[lo:lo + 512], add_special_tokens=False)["input_ids"]])
    return [None if t is None else next(lengths) for t in texts]


def where(row: dict) -> str:
    """`file:line: reason` of a rejects-file row or a record with its error."""
    return f"{row.get('file')}:{row.get('index')}: {row['reason']}"


def _offending(records: list[dict], errors: dict[str, str], load_rejects: list[dict], limit: int = 20) -> list[str]:
    rows = [*load_rejects, *({**r, "reason": f"preflight:{errors[r['id']]}"} for r in records if r["id"] in errors)]
    rows.sort(key=lambda r: (str(r.get("file")), r.get("index") if isinstance(r.get("index"), int) else -1))
    return [where(r) for r in rows[:limit]]


def preflight(records: list[dict], cfg: PreflightConfig, tokenizer_path: str | None, max_length: int,
              system_prompt: str | None = None, load_rejects: list[dict] | None = None) -> tuple[dict, dict, dict]:
    """-> ({id: error rule}, {id: token count}, report); raises PreflightError past the threshold.

    `load_rejects` (load_rejects.jsonl rows) count as invalid input too and are listed in the error."""
    load_rejects = load_rejects or []
    errors = {r["id"]: e for r in records if (e := structure_error(r))}
    tokens: dict[str, int] = {}
    report: dict = {"records": len(records), "load_rejected": len(load_rejects)}
    if cfg.count_tokens and tokenizer_path:
        valid = [r for r in records if r["id"] not in errors]
        for r, n in zip(valid, token_counts(valid, tokenizer_path, system_prompt)):
            if n is None:
                errors[r["id"]] = "chat_template_error"
            else:
                tokens[r["id"]] = n
        counts = np.array(list(tokens.values()) or [0])
        report["tokens"] = {"total": int(counts.sum()), "mean": float(counts.mean()), "p50": float(np.median(counts)),
                            "p95": float(np.percentile(counts, 95)), "max": int(counts.max()),
                            "max_length": max_length, "over_max_length": int((counts > max_length).sum()),
                            "over_max_length_share": float((counts > max_length).mean()) if tokens else 0.0}
    by_rule = dict(Counter(errors.values()))
    unreadable = dict(Counter(r["reason"].split(":", 1)[0] for r in load_rejects))
    seen = len(records) + len(load_rejects)
    report.update(errors=len(errors), by_rule=by_rule, load_by_reason=unreadable, max_error_share=cfg.max_error_share,
                  error_share=(len(errors) + len(load_rejects)) / seen if seen else 0.0)
    if report["error_share"] > cfg.max_error_share:
        bad = len(errors) + len(load_rejects)
        totals = ", ".join(f"{k} {v}" for k, v in Counter({**unreadable, **{f"preflight:{k}": v for k, v in
                                                                            by_rule.items()}}).most_common())
        listing = "\n".join(f"  {line}" for line in _offending(records, errors, load_rejects))
        raise PreflightError(
            f"pre-flight: {report['error_share']:.1%} of {seen} input records are invalid "
            f"({len(load_rejects)} unreadable, by rule: {by_rule}), more than curate.preflight.max_error_share "
            f"{cfg.max_error_share:.1%}; see the load and curate rejects files for each record, file and line\n"
            f"totals by reason: {totals}\nfirst {min(bad, 20)} of {bad}:\n{listing}")
    return errors, tokens, report


def tokenizer_files(path: str | None) -> list[Path]:
    """The files that decide token counts (for cache keys; never the weights)."""
    if not path:
        return []
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "tokenizer.model")
    return [Path(path) / n for n in names if (Path(path) / n).is_file()]
