"""The held-out stage: specialisation on the held-out test split, base vs fine-tuned.

Greedy generation with the training chat template; scored by exact match on the reference and by
label accuracy (first line, case and trailing punctuation ignored), plus macro-F1 and a confusion
table when records carry labels; records that call tools also score `tool_call_acc` (tool_calls.py). Deltas
vs the base come with 95% paired-bootstrap CIs.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from sftflow import cache, precision, stats
from sftflow import metrics as names
from sftflow.cache import cached
from sftflow.configs.schema import HeldoutConfig
from sftflow.models import load_causal_lm, load_tokenizer, tokenizer_digest
from sftflow.records import prompt_messages, read_jsonl, reference, write_jsonl
from sftflow.results import Heldout, ModelRef
from sftflow.tasks.data.readers import DataError
from sftflow.tasks.evaluation.tool_calls import call_matches, first_calls
from sftflow.tasks.training.chat import chat_messages
from sftflow.tasks.evaluation.shared_prefix import generate_after_prefix, prefix_groups
from sftflow.tasks.training.template import render, with_system
from sftflow.tracking import stage

STAGE = "heldout"

def normalise_label(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.strip().strip(".!\"'").casefold()


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
             tools: list[list | None] | None = None) -> list[str]:
    """Greedy completions in input order. The opening prompts share (system prompt, a source's task definition) is
    computed once per group of prompts (shared_prefix.py); batches of similar length. tools: per conversation."""
    tools = tools or [None] * len(conversations)
    prompts = [tok(render(tok, msgs, add_generation_prompt=True, tools=t), add_special_tokens=False)["input_ids"]
               for msgs, t in zip(conversations, tools)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def greedy(ids, attention, **cache):
        return model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=tok.eos_token_id, **cache)

    out = [""] * len(prompts)
    for length, members in prefix_groups(prompts):
        new = generate_after_prefix(model, [prompts[m] for m in members], length, batch_size, pad, greedy)
        for m, tokens in zip(members, new):
            out[m] = tok.decode(tokens, skip_special_tokens=True).strip()
    return out


def correct(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-record 0/1 scores: exact match on the reference, and label match after normalisation."""
    return {"exact_match": [float(p == r.strip()) for p, r in zip(predictions, references)],
            "label_acc": [float(normalise_label(p) == normalise_label(r)) for p, r in zip(predictions, references)]}


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references) or 1
    return {name: sum(v) / n for name, v in correct(predictions, references).items()}


def label_report(predictions: list[str], labels: list[str]) -> dict:
    """Macro-F1 over the reference labels and a confusion table (predictions outside them: `<other>`)."""
    classes = sorted({normalise_label(label) for label in labels})
    columns = classes + ["<other>"]
    ids = {name: i for i, name in enumerate(classes)}
    truth = np.array([ids[normalise_label(label)] for label in labels])
    pred = np.array([ids.get(normalise_label(p), -1) for p in predictions])
    matrix = [[int(np.sum((truth == i) & (pred == (j if j < len(classes) else -1)))) for j in range(len(columns))]
              for i in range(len(classes))]
    return {"macro_f1": float(stats.macro_f1(truth, pred, len(classes))), "truth": truth, "pred": pred,
            "confusion": {"labels": classes, "predicted": columns, "matrix": matrix}}


def side_by_side(rows: list[dict], tags: list[str], limit: int) -> str:
    """A few prompts with the reference and each model's generation, for reading rather than scoring;
    records where the models disagree come first."""
    out = ["# Held-out generations, side by side", ""]
    disagree_first = sorted(rows, key=lambda r: len({r[f"{t}_prediction"] for t in tags}) == 1)
    for row in disagree_first[:limit]:
        out += [f"## {row['id']} ({row['source']})", "", "```text", row["prompt"][-1500:], "```", "",
                f"- reference: `{row['reference']}`"]
        out += [f"- {tag}: `{row[f'{tag}_prediction']}`" if row[f"{tag}_prediction"] else f"- {tag}: (empty)"
                for tag in tags]
        out.append("")
    return "\n".join(out)


def result_key(test_path: str, models: dict[str, ModelRef], cfg: HeldoutConfig, settings: dict,
               chat_tokenizer: str | None) -> str | None:
    """Cache key of a held-out comparison: the test split's content, every model's content digest and
    tokenizer, the settings and library versions; None when a model has no content digest (a hub id)."""
    if any(not spec.get("digest") or spec["digest"].startswith("hub:") for spec in models.values()):
        return None
    tokenizers = {tag: tokenizer_digest(chat_tokenizer or spec.get("adapter") or spec["path"])
                  for tag, spec in models.items()}
    libs = {lib: version(lib) for lib in ("torch", "transformers", "peft")}
    return cache.key("heldout-v1", Path(test_path), {tag: spec["digest"] for tag, spec in models.items()},
                     tokenizers, cfg, settings, precision.inference(), libs)


@stage(STAGE)
def heldout(test_path: str, models: dict[str, ModelRef], cfg: HeldoutConfig, out_dir: Path,
            system_prompt: str | None = None, trust_remote_code: bool = False, bootstrap_iters: int = 2000,
            seed: int = 0, chat_tokenizer: str | None = None) -> Heldout:
    """models: {"base": {"path", "adapter", "digest"?}, "ft": {...}, ...} -> per-model scores, deltas vs base
    with 95% CIs, macro-F1 and confusion tables for labelled data, predictions and side-by-side examples.
    When every model carries a content digest, an unchanged rerun reads the cached result (heldout/cache_hit)."""
    settings = {"system_prompt": system_prompt, "bootstrap_iters": bootstrap_iters, "seed": seed}

    def compute(folder: Path) -> Heldout:
        return _evaluate(test_path, models, cfg, folder, system_prompt, trust_remote_code, bootstrap_iters, seed,
                         chat_tokenizer)

    key = result_key(test_path, models, cfg, settings, chat_tokenizer)
    if key is None:
        result = compute(out_dir)
        result["metrics"][names.stage_cache_hit(STAGE)] = 0
    else:
        result = cached(STAGE, key, out_dir, compute)
    return {**result, "params": {**result.get("params", {}), **precision.eval_params()}}


def _evaluate(test_path: str, models: dict[str, ModelRef], cfg: HeldoutConfig, out_dir: Path,
              system_prompt: str | None, trust_remote_code: bool, bootstrap_iters: int, seed: int,
              chat_tokenizer: str | None) -> Heldout:
    records = list(read_jsonl(Path(test_path)))[: cfg.limit]
    if not records:
        raise DataError(f"{test_path}: the test split is empty; raise split.test_ratio or add data")
    refs = [reference(r) for r in records]
    labelled = all(r.get("label") is not None for r in records)
    prompts = [with_system(prompt_messages(r), system_prompt) for r in records]
    tools = [r.get("tools") for r in records]
    metrics, preds, per_record, labels, confusion = {names.HELDOUT_RECORDS: len(records)}, {}, {}, {}, {}
    for tag, spec in models.items():
        # One chat template for every model (the training one, when given), so prompts are identical.
        tok = load_tokenizer(chat_tokenizer or spec.get("adapter") or spec["path"], trust_remote_code)
        model = load_causal_lm(spec["path"], trust_remote_code, adapter=spec.get("adapter"), merge=True).eval()
        start = time.perf_counter()
        preds[tag] = generate(model, tok, [chat_messages(p, "keep", tok.chat_template) for p in prompts],
                              cfg.max_new_tokens, cfg.batch_size, tools)
        per_record[tag] = correct(preds[tag], refs)
        if calls := first_calls(tok, records, system_prompt):
            said = generate(model, tok, [c[1] for c in calls], cfg.max_new_tokens, cfg.batch_size,
                            [tools[c[0]] for c in calls])
            per_record[tag]["tool_call_acc"] = call_matches(tok, said, [c[2] for c in calls])
        metrics[names.heldout(tag, "wall_s")] = time.perf_counter() - start
        for name, values in per_record[tag].items():
            metrics[names.heldout(tag, name)] = sum(values) / len(values)
        if labelled:
            labels[tag] = label_report(preds[tag], refs)
            metrics[names.heldout(tag, "macro_f1")] = labels[tag]["macro_f1"]
            confusion[tag] = labels[tag]["confusion"]
        del model
    for tag in (t for t in preds if t != "base" and "base" in preds):
        for name in per_record[tag]:
            result = stats.compare(per_record["base"][name], per_record[tag][name], bootstrap_iters, seed=seed)
            metrics[names.heldout_delta(name, model=tag)] = result["delta"]
            metrics.update({names.heldout_delta(name, s, tag): result[s] for s in names.DELTA_STATS})
        if labelled:
            base, ft = labels["base"], labels[tag]
            low, high = stats.macro_f1_delta_ci(base["truth"], base["pred"], ft["pred"], len(confusion[tag]["labels"]),
                                                bootstrap_iters, seed=seed)
            metrics.update({names.heldout_delta("macro_f1", model=tag): ft["macro_f1"] - base["macro_f1"],
                            names.heldout_delta("macro_f1", "ci_low", tag): low,
                            names.heldout_delta("macro_f1", "ci_high", tag): high})
    rows = [{"id": r["id"], "source": r["source"], "prompt": prompts[i][-1]["content"], "reference": ref,
             **{f"{t}_prediction": p[i] for t, p in preds.items()}}
            for i, (r, ref) in enumerate(zip(records, refs))]
    write_jsonl(out_dir / "predictions.jsonl", rows)
    (out_dir / "examples.md").write_text(side_by_side(rows, list(preds), cfg.examples))
    (out_dir / "heldout.json").write_text(json.dumps({"metrics": metrics, "confusion": confusion}, indent=2))
    return {"metrics": metrics, "confusion": confusion,
            "artifacts": [out_dir / "predictions.jsonl", out_dir / "heldout.json", out_dir / "examples.md"]}
