"""Metric names: each family round-trips through its builder and parser, and the builders write exactly the
names the README's metric table documents (users' MLflow comparisons depend on them)."""

import re
from pathlib import Path

import pytest

from sftflow import metrics as names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("tag,scope,metric", [("base", "mmlu", "acc"), ("ft", "mmlu_stem", "acc"),
                                              ("ft_best", "mmlu/anatomy", "acc"), ("model", "bbh", "n"),
                                              ("base", "sftflow_mmlu/sftflow_mmlu_virology", "acc")])
def test_eval_scores_round_trip(tag, scope, metric):
    parsed = names.parse_eval(names.eval_score(tag, scope, metric))
    assert parsed == (tag, scope, metric)
    assert parsed.subtask == ("/" in scope) and parsed.count == (metric == "n")
    assert names.parse_eval(names.eval_count(tag, scope)).count


@pytest.mark.parametrize("field", names.EVAL_WORK)
def test_eval_work_round_trips_and_is_not_a_score(field):
    assert names.parse_eval_work(names.eval_work("base", field)) == ("base", field)
    assert names.parse_eval(names.eval_work("base", field)) is None
    assert names.parse_eval_work(names.eval_score("base", "mmlu", "acc")) is None


@pytest.mark.parametrize("name,stat,model", [("mmlu", s, "ft") for s in names.FORGETTING_STATS] + [
    ("mmlu_stem", "ci_low", "ft"), ("mmlu/anatomy", "delta", "ft"), ("mmlu", "delta", "ft_best"),
    ("mmlu", "p_value", "model"), ("bbh/navigate", "delta", "ft_best")])
def test_forgetting_round_trips(name, stat, model):
    built = names.forgetting(name, stat, model)
    assert names.parse_forgetting(built, models=("ft_best", "model")) == (name, stat, model)
    assert names.parse_forgetting(built).label == built.removeprefix("forgetting/").removesuffix(f"/{stat}")


def test_forgetting_reads_an_ambiguous_delta_as_a_subtask_unless_told_the_model():
    assert names.parse_forgetting("forgetting/ft_best/mmlu/delta") == ("ft_best/mmlu", "delta", "ft")
    assert names.parse_forgetting("forgetting/ft_best/mmlu/delta", ("ft_best",)) == ("mmlu", "delta", "ft_best")
    assert names.parse_forgetting("forgetting/mmlu/n") is None  # not a forgetting statistic


@pytest.mark.parametrize("measure,stat,model", [(m, s, t) for m in ("exact_match", "label_acc", "macro_f1")
                                                for s in (None, *names.DELTA_STATS) for t in ("ft", "ft_best")])
def test_heldout_deltas_round_trip(measure, stat, model):
    built = names.heldout_delta(measure, stat, model)
    assert names.parse_heldout_delta(built) == (measure, stat, model)
    assert names.parse_heldout_delta(built).label == built.removeprefix("heldout/delta/")
    assert names.parse_heldout(built) is None


def test_heldout_scores_round_trip():
    assert names.parse_heldout(names.heldout("base", "label_acc")) == ("base", "label_acc")
    assert names.parse_heldout(names.HELDOUT_RECORDS) is None and names.parse_heldout_delta("heldout/base/x") is None


def _expand(pattern: str) -> set[str]:
    """`a/{b,c}` -> {a/b, a/c}."""
    m = re.search(r"\{([^}]*)\}", pattern)
    return {pattern} if m is None else {x for alt in m.group(1).split(",")
                                        for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])}


def test_the_builders_write_the_names_the_readme_table_documents():
    table = README.split("| metric | meaning |", 1)[1].split("\n\n", 1)[0]
    documented, previous = set(), ""
    for line in table.splitlines()[2:]:
        for span in re.findall(r"`([^`]*/[^`]*)`", line.split("|")[1]):
            if span.startswith("..."):  # `.../ci_low` continues the row's first name
                span = previous + span[3:]
            else:
                previous = span
            documented |= _expand(span)
    built = {names.eval_score("<tag>", "mmlu", "acc"), names.eval_score("<tag>", "bbh", "exact_match"),
             names.eval_score("<tag>", "mmlu_stem", "acc"), names.eval_score("<tag>", "mmlu/<subject>", "acc"),
             names.eval_score("<tag>", "bbh/<subtask>", "exact_match"),
             *(names.eval_work("<tag>", f) for f in names.EVAL_WORK),
             *(names.forgetting("<bench>", s) for s in names.FORGETTING_STATS),
             names.forgetting("<bench>/<subtask>", "delta"),
             *(names.heldout("<tag>", m) for m in ("exact_match", "label_acc", "macro_f1", "tool_call_acc")),
             names.heldout_delta("<measure>"), *(names.heldout_delta("<measure>", s) for s in names.DELTA_STATS),
             *(names.heldout("<tag>", f) for f in ("cached_items", "evaluated_items")),
             names.champion_delta("<measure>"), *(names.champion_delta("<measure>", s) for s in names.DELTA_STATS),
             *(names.split_count(k) for k in names.SPLIT_HISTORY), names.GATE_PASSED}
    assert documented == built
    # A model other than ft carries its own prefix, as the paragraph under the table says.
    assert f"`{names.forgetting('mmlu', 'delta', 'model')}`" in README
