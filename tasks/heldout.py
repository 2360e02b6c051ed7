"""Stage 6a: specialisation on the held-out test split, base vs fine-tuned.

Greedy generation with the training chat template; scored by exact match on the reference and by
label accuracy (first line, case and trailing punctuation ignored).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sftflow.configs.schema import HeldoutConfig
from sftflow.models import load_causal_lm, load_tokenizer
from sftflow.records import prompt_messages, read_jsonl, reference, write_jsonl
from sftflow.tasks.template import render, with_system
from sftflow.tracking import stage_task


def normalise_label(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.strip().strip(".!\"'").casefold()


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions, batched by similar length, returned in input order."""
    import torch

    tok.padding_side = "left"
    texts = [render(tok, msgs, add_generation_prompt=True) for msgs in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for i, seq in zip(idx, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            out[i] = seq.strip()
    return [out[i] for i in range(len(texts))]


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references) or 1
    return {"exact_match": sum(p == r.strip() for p, r in zip(predictions, references)) / n,
            "label_acc": sum(normalise_label(p) == normalise_label(r) for p, r in zip(predictions, references)) / n}


def heldout(test_path: str, models: dict[str, dict], cfg: HeldoutConfig, out_dir: Path,
            system_prompt: str | None = None, trust_remote_code: bool = False) -> dict:
    """models: {"base": {"path", "adapter"}, "ft": {...}} -> per-model scores and a predictions file."""
    records = list(read_jsonl(Path(test_path)))[: cfg.limit]
    if not records:
        raise ValueError(f"{test_path}: the test split is empty; raise split.test_ratio or add data")
    refs = [reference(r) for r in records]
    prompts = [with_system(prompt_messages(r), system_prompt) for r in records]
    metrics, preds = {"heldout/records": len(records)}, {}
    for tag, spec in models.items():
        tok = load_tokenizer(spec.get("adapter") or spec["path"], trust_remote_code)
        model = load_causal_lm(spec["path"], trust_remote_code, adapter=spec.get("adapter")).eval()
        start = time.perf_counter()
        preds[tag] = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size)
        metrics[f"heldout/{tag}/wall_s"] = time.perf_counter() - start
        for name, value in score(preds[tag], refs).items():
            metrics[f"heldout/{tag}/{name}"] = value
        del model
    if {"base", "ft"} <= preds.keys():
        for name in ("exact_match", "label_acc"):
            metrics[f"heldout/delta/{name}"] = metrics[f"heldout/ft/{name}"] - metrics[f"heldout/base/{name}"]
    rows = [{"id": r["id"], "source": r["source"], "reference": ref, **{f"{t}_prediction": p[i] for t, p in preds.items()}}
            for i, (r, ref) in enumerate(zip(records, refs))]
    write_jsonl(out_dir / "predictions.jsonl", rows)
    (out_dir / "heldout.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics, "artifacts": [out_dir / "predictions.jsonl", out_dir / "heldout.json"]}


heldout_task = stage_task(heldout, "heldout")
