"""The held-out stage: specialisation on the held-out test split, base vs fine-tuned.

Greedy generation with the training chat template; scored by exact match on the reference and by
label accuracy (first line, case and trailing punctuation ignored), plus macro-F1 and a confusion
table when records carry labels; records that call tools also score `tool_call_acc` (tool_calls.py). Deltas
vs the base come with 95% paired-bootstrap CIs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sftflow import precision, stats
from sftflow import metrics as names
from sftflow.configs.schema import HeldoutConfig
from sftflow.models import load_causal_lm, load_tokenizer
from sftflow.records import prompt_messages, read_jsonl, reference, write_jsonl
from sftflow.results import Heldout, ModelRef
from sftflow.tasks.data.readers import DataError
from sftflow.tasks.evaluation import item_cache
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


def model_items(records: list[dict], spec: ModelRef, cfg: HeldoutConfig, system_prompt: str | None,
                trust_remote_code: bool, chat_tokenizer: str | None) -> tuple[list[dict], dict]:
    """One model's generation per record ({"prediction", "tool_call", "tool_call_acc"}; the tool fields None
    when the record calls no tool), cached per record (item_cache.py): only the records missing from the cache
    are generated, in one batched call. Also {"cached_items", "evaluated_items", "wall_s"}."""
    key = item_cache.model_key(spec, cfg, system_prompt, chat_tokenizer)
    keys = [item_cache.item_key(r) for r in records]
    rows = item_cache.read(key) if key else {}
    todo = [i for i, k in enumerate(keys) if k not in rows]
    info = {"cached_items": len(records) - len(todo), "evaluated_items": len(todo), "wall_s": 0.0}
    if todo:
        # One chat template for every model (the training one, when given), so prompts are identical.
        tok = load_tokenizer(chat_tokenizer or spec.get("adapter") or spec["path"], trust_remote_code)
        model = load_causal_lm(spec["path"], trust_remote_code, adapter=spec.get("adapter"), merge=True).eval()
        start = time.perf_counter()
        missing = [records[i] for i in todo]
        tools = [r.get("tools") for r in missing]
        convs = [chat_messages(with_system(prompt_messages(r), system_prompt), "keep", tok.chat_template)
                 for r in missing]
        new = [{"prediction": p, "tool_call": None, "tool_call_acc": None}
               for p in generate(model, tok, convs, cfg.max_new_tokens, cfg.batch_size, tools)]
        if calls := first_calls(tok, missing, system_prompt):
            said = generate(model, tok, [c[1] for c in calls], cfg.max_new_tokens, cfg.batch_size,
                            [tools[c[0]] for c in calls])
            for (j, _, _), text, hit in zip(calls, said, call_matches(tok, said, [c[2] for c in calls])):
                new[j].update(tool_call=text, tool_call_acc=hit)
        info["wall_s"] = time.perf_counter() - start
        del model
        fresh = {keys[i]: row for i, row in zip(todo, new)}
        if key:
            item_cache.write(key, fresh)
        rows = {**rows, **fresh}
    return [rows[k] for k in keys], info


def read_test_split(test_path: str | Path, cfg: HeldoutConfig) -> list[dict]:
    records = list(read_jsonl(Path(test_path)))[: cfg.limit]
    if not records:
        raise DataError(f"{test_path}: the test split is empty; raise split.test_ratio or add data")
    return records


def model_predictions(test: str | Path | list[dict], spec: ModelRef, cfg: HeldoutConfig,
                      system_prompt: str | None = None, trust_remote_code: bool = False,
                      chat_tokenizer: str | None = None) -> list[dict]:
    """One model's held-out rows (id, reference, prediction, per-record scores) from the same per-record
    cache as the stage, so another stage can read them without evaluating again."""
    records = test if isinstance(test, list) else read_test_split(test, cfg)
    items, _ = model_items(records, spec, cfg, system_prompt, trust_remote_code, chat_tokenizer)
    refs = [reference(r) for r in records]
    scores = correct([it["prediction"] for it in items], refs)
    return [{"id": r["id"], "reference": ref, **it, **{name: v[i] for name, v in scores.items()}}
            for i, (r, ref, it) in enumerate(zip(records, refs, items))]


@stage(STAGE)
def heldout(test_path: str, models: dict[str, ModelRef], cfg: HeldoutConfig, out_dir: Path,
            system_prompt: str | None = None, trust_remote_code: bool = False, bootstrap_iters: int = 2000,
            seed: int = 0, chat_tokenizer: str | None = None) -> Heldout:
    """models: {"base": {"path", "adapter", "digest"?}, "ft": {...}, ...} -> per-model scores, deltas vs base
    with 95% CIs, macro-F1 and confusion tables for labelled data, predictions and side-by-side examples.
    Generations of models with a content digest are cached per record: heldout/cache_hit is 1 when no model
    generated anything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _evaluate(test_path, models, cfg, out_dir, system_prompt, trust_remote_code, bootstrap_iters, seed,
                       chat_tokenizer)
    return {**result, "params": {**result.get("params", {}), **precision.eval_params()}}


def _evaluate(test_path: str, models: dict[str, ModelRef], cfg: HeldoutConfig, out_dir: Path,
              system_prompt: str | None, trust_remote_code: bool, bootstrap_iters: int, seed: int,
              chat_tokenizer: str | None) -> Heldout:
    records = read_test_split(test_path, cfg)
    refs = [reference(r) for r in records]
    labelled = all(r.get("label") is not None for r in records)
    prompts = [with_system(prompt_messages(r), system_prompt) for r in records]
    metrics, preds, per_record, labels, confusion = {names.HELDOUT_RECORDS: len(records)}, {}, {}, {}, {}
    generated = 0
    for tag, spec in models.items():
        items, info = model_items(records, spec, cfg, system_prompt, trust_remote_code, chat_tokenizer)
        generated += info["evaluated_items"]
        preds[tag] = [it["prediction"] for it in items]
        per_record[tag] = correct(preds[tag], refs)
        if calls := [it["tool_call_acc"] for it in items if it["tool_call_acc"] is not None]:
            per_record[tag]["tool_call_acc"] = calls
        metrics.update({names.heldout(tag, field): value for field, value in info.items()})
        for name, values in per_record[tag].items():
            metrics[names.heldout(tag, name)] = sum(values) / len(values)
        if labelled:
            labels[tag] = label_report(preds[tag], refs)
            metrics[names.heldout(tag, "macro_f1")] = labels[tag]["macro_f1"]
            confusion[tag] = labels[tag]["confusion"]
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
    if names.CHAMPION in preds and names.FT in preds:  # paired on the same records: candidate minus champion
        for name in per_record[names.FT].keys() & per_record[names.CHAMPION].keys():
            result = stats.compare(per_record[names.CHAMPION][name], per_record[names.FT][name], bootstrap_iters,
                                   seed=seed)
            metrics[names.champion_delta(name)] = result["delta"]
            metrics.update({names.champion_delta(name, s): result[s] for s in names.DELTA_STATS})
    rows = [{"id": r["id"], "source": r["source"], "prompt": prompts[i][-1]["content"], "reference": ref,
             **{f"{t}_prediction": p[i] for t, p in preds.items()}}
            for i, (r, ref) in enumerate(zip(records, refs))]
    write_jsonl(out_dir / "predictions.jsonl", rows)
    (out_dir / "examples.md").write_text(side_by_side(rows, list(preds), cfg.examples))
    (out_dir / "heldout.json").write_text(json.dumps({"metrics": metrics, "confusion": confusion}, indent=2))
    metrics[names.stage_cache_hit(STAGE)] = int(generated == 0)
    return {"metrics": metrics, "confusion": confusion,
            "artifacts": [out_dir / "predictions.jsonl", out_dir / "heldout.json", out_dir / "examples.md"]}
