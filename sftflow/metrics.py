"""Every evaluation metric name, built and parsed in one place.

Users compare runs in MLflow by these names and the README's metric table documents them, so they never
change; stages build them here and the CLI, the report and `sftflow compare` read them back here.
`<tag>` is an evaluated model (`base`, `ft`; `model` in `sftflow eval`). Comparisons with the base carry the
model in their prefix unless it is "ft": `forgetting/mmlu/delta`, `forgetting/model/mmlu/delta`.
"""

from __future__ import annotations

from typing import NamedTuple

FT = "ft"  # the model whose comparisons with the base carry no model in their name
CHAMPION = "champion"  # the model name's version in service, evaluated beside the candidate
COUNT = "n"  # items a benchmark score averages over: eval/<tag>/<bench>/n
EVAL_WORK = ("cached_tasks", "evaluated_tasks", "wall_s")  # lm-eval work done for one model
DELTA_STATS = ("ci_low", "ci_high", "p_value", "mde")  # mde: minimum detectable effect, 80% power
FORGETTING_STATS = ("delta", *DELTA_STATS, "significant_drop")
HELDOUT_RECORDS = "heldout/records"
GATE_PASSED = "gate/passed"
SPLIT_HISTORY = ("new", "seen", "near_seen", "bridges")  # records against what earlier versions saw


def _compared(kind: str, model: str) -> str:
    return kind if model == FT else f"{kind}/{model}"


# --- building ---

def eval_score(tag: str, scope: str, metric: str) -> str:
    """`eval/<tag>/<scope>/<metric>`; scope is a benchmark (`mmlu`), an lm-eval category (`mmlu_stem`) or
    `<benchmark>/<subtask>`."""
    return f"eval/{tag}/{scope}/{metric}"


def eval_count(tag: str, benchmark: str) -> str:
    return eval_score(tag, benchmark, COUNT)


def eval_work(tag: str, field: str) -> str:
    """`eval/<tag>/{cached_tasks,evaluated_tasks,wall_s}`."""
    return f"eval/{tag}/{field}"


def forgetting(name: str, stat: str, model: str = FT) -> str:
    """`forgetting[/<model>]/<name>/<stat>`; name is a benchmark, a category or `<benchmark>/<subtask>`."""
    return f"{_compared('forgetting', model)}/{name}/{stat}"


def heldout(tag: str, measure: str) -> str:
    """`heldout/<tag>/<measure>`: exact_match, label_acc, macro_f1, tool_call_acc or wall_s of one model."""
    return f"heldout/{tag}/{measure}"


def heldout_delta(measure: str, stat: str | None = None, model: str = FT) -> str:
    """`heldout/delta[/<model>]/<measure>[/<stat>]`: the model minus the base on the test split."""
    return f"{_compared('heldout/delta', model)}/{measure}" + (f"/{stat}" if stat else "")


def split_count(name: str) -> str:
    """`split/<name>`: records of the data stage (train, val, test, contaminated, or a SPLIT_HISTORY count)."""
    return f"split/{name}"


def champion_delta(measure: str, stat: str | None = None) -> str:
    """`champion/delta/<measure>[/<stat>]`: the judged model minus the champion on the same items; measure is a
    held-out measure (`label_acc`) or a benchmark or category (`mmlu`, `mmlu_stem`)."""
    return f"champion/delta/{measure}" + (f"/{stat}" if stat else "")


def stage_duration(stage: str) -> str:
    return f"{stage}/duration_s"


def stage_cache_hit(stage: str) -> str:
    """`<stage>/cache_hit`: 1 when an unchanged rerun read the stage's result from the cache."""
    return f"{stage}/cache_hit"


# --- parsing ---

class EvalName(NamedTuple):
    tag: str
    scope: str
    metric: str

    @property
    def subtask(self) -> bool:
        return "/" in self.scope

    @property
    def count(self) -> bool:
        return self.metric == COUNT


class ForgettingName(NamedTuple):
    name: str
    stat: str
    model: str = FT

    @property
    def label(self) -> str:
        """The name between `forgetting/` and the statistic."""
        return self.name if self.model == FT else f"{self.model}/{self.name}"


class HeldoutDeltaName(NamedTuple):
    measure: str
    stat: str | None = None
    model: str = FT

    @property
    def label(self) -> str:
        """The name after `heldout/delta/`."""
        return "/".join(p for p in (None if self.model == FT else self.model, self.measure, self.stat) if p)


def parse_eval(name: str) -> EvalName | None:
    """A benchmark score or count (`eval/<tag>/<scope>/<metric>`), else None."""
    parts = name.split("/")
    if parts[0] != "eval" or len(parts) not in (4, 5):
        return None
    return EvalName(parts[1], "/".join(parts[2:-1]), parts[-1])


def parse_eval_work(name: str) -> tuple[str, str] | None:
    """(tag, field) of `eval/<tag>/<field>` for the lm-eval work fields, else None."""
    parts = name.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "eval" and parts[2] in EVAL_WORK else None


def parse_forgetting(name: str, models: tuple[str, ...] = ()) -> ForgettingName | None:
    """The parts of a forgetting name, else None.

    `forgetting/a/b/delta` reads two ways (model a on benchmark b, or subtask b of benchmark a): it is a
    model's only when `a` is one of `models`. Only deltas exist per subtask, so other statistics are not
    ambiguous."""
    parts = name.split("/")
    if parts[0] != "forgetting" or len(parts) < 3 or parts[-1] not in FORGETTING_STATS:
        return None
    body, stat = parts[1:-1], parts[-1]
    if len(body) == 3 or (len(body) == 2 and (stat != "delta" or body[0] in models)):
        return ForgettingName("/".join(body[1:]), stat, body[0])
    return ForgettingName("/".join(body), stat) if len(body) <= 2 else None


def parse_heldout(name: str) -> tuple[str, str] | None:
    """(tag, measure) of `heldout/<tag>/<measure>`, else None (deltas: parse_heldout_delta)."""
    parts = name.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "heldout" and parts[1] != "delta" else None


def parse_heldout_delta(name: str) -> HeldoutDeltaName | None:
    parts = name.split("/")
    if parts[:2] != ["heldout", "delta"] or not 3 <= len(parts) <= 5:
        return None
    body = parts[2:]
    stat = body.pop() if len(body) > 1 and body[-1] in DELTA_STATS else None
    model = body.pop(0) if len(body) == 2 else FT
    return HeldoutDeltaName(body[0], stat, model) if len(body) == 1 else None
