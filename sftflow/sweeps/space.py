"""A sweep's search space (YAML): which config keys vary, how they are sampled, how many trials run.

```yaml
sampler: grid            # grid | tpe (default) | random
n_trials: 4              # grid: defaults to the grid's size
params:                  # dotted config keys, as `--set` takes them
  train.lora.r: [4, 16]                                   # a list: grid values (categorical for tpe/random)
  train.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
  train.max_steps: {type: int, low: 4, high: 12, step: 4}
overrides: [eval.mmlu.limit=10]   # every trial, before `--set` and its own values
concurrency: 1                    # trials at once (threads of this process); default 1
pruner: median   # on validation loss: median (default for tpe/random) | none (default for grid) |
                 # {type: median, n_startup_trials: 5, n_warmup_steps: 0} | {type: threshold, max_val_loss: 4.0}
```
The file may also hold these keys under a top-level `sweep:` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftflow import cache
from sftflow.errors import UserError

Scalar = Union[bool, int, float, str, None]


class SweepError(UserError, ValueError):
    """A search space that cannot be used; says which key and why."""


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False


class ChoiceParam(_Param):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)


Distribution = Annotated[Union[FloatParam, IntParam, ChoiceParam], Field(discriminator="type")]


class MedianPruner(_Param):
    """Optuna's: stop a trial whose validation loss is worse than the median of earlier trials at that step."""
    type: Literal["median"]
    n_startup_trials: int = Field(5, ge=0, description="trials that always run to the end first")
    n_warmup_steps: int = Field(0, ge=0, description="training steps before a trial can be pruned")
    interval_steps: int = Field(1, ge=1)


class ThresholdPruner(_Param):
    """Stop a trial whose validation loss goes above max_val_loss (or is NaN)."""
    type: Literal["threshold"]
    max_val_loss: float
    n_warmup_steps: int = Field(0, ge=0)


class NoPruner(_Param):
    type: Literal["none"]


Pruner = Annotated[Union[MedianPruner, ThresholdPruner, NoPruner], Field(discriminator="type")]


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sampler: Literal["grid", "tpe", "random"] = "tpe"
    params: dict[str, Union[list[Scalar], Distribution]] = Field(min_length=1)
    n_trials: int | None = Field(None, ge=1, description="grid: defaults to the number of grid points")
    seed: int = 0
    overrides: list[str] = Field([], description="`key=value` applied to every trial (e.g. smaller eval limits)")
    # Trials at once share this process (threads); training keeps process-wide device state (Accelerate's), so
    # one trial per GPU would need a process per trial: not done yet.
    concurrency: int = Field(1, ge=1, description="trials at once (threads of the sweep's process)")
    pruner: Pruner | None = Field(None, description="on validation loss; default median, none for grid")

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_by_name(cls, value):
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self):
        for name, param in self.params.items():
            if isinstance(param, list) and not param:
                raise ValueError(f"params.{name}: an empty list of values")
            if isinstance(param, (FloatParam, IntParam)) and param.low > param.high:
                raise ValueError(f"params.{name}: low {param.low} > high {param.high}")
        if self.sampler == "grid":
            ranged = [n for n, p in self.params.items() if not isinstance(p, list)]
            if ranged:
                raise ValueError(f"sampler grid takes lists of values; {', '.join(ranged)} "
                                 "are distributions (use sampler tpe or random)")
        elif self.n_trials is None:
            raise ValueError(f"sampler {self.sampler} needs n_trials")
        if self.pruner is None:
            self.pruner = NoPruner(type="none") if self.sampler == "grid" else MedianPruner(type="median")
        return self

    def grid(self) -> dict[str, list]:
        return {name: list(values) for name, values in self.params.items()}

    def trials(self) -> int:
        """How many trials the sweep runs in all."""
        if self.n_trials is not None:
            return self.n_trials
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size

    def digest(self) -> str:
        # The pruner decides which trials stop early, not what a trial is: changing it resumes the same study.
        return cache.key(self.model_dump(mode="json", exclude={"concurrency", "n_trials", "pruner"}))


def load_spec(path: str | Path, n_trials: int | None = None) -> SweepSpec:
    """The space file (its keys at the top level or under `sweep:`), `n_trials` overriding the file's."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep space file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepError(f"{p}: not valid YAML: {exc}") from None
    if isinstance(tree, dict) and isinstance(tree.get("sweep"), dict):
        tree = tree["sweep"]
    if not isinstance(tree, dict):
        raise SweepError(f"{p}: top level must be a mapping (sampler, params, n_trials, ...)")
    if n_trials is not None:
        tree = {**tree, "n_trials": n_trials}
    try:
        return SweepSpec.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise SweepError(f"{p}: invalid sweep space:\n  " + "\n  ".join(lines)) from None


def distributions(spec: SweepSpec) -> dict:
    """Optuna distributions for `study.ask` (grid values become categorical ones: the grid sampler picks them)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, p in spec.params.items():
        if isinstance(p, list):
            out[name] = CategoricalDistribution(p)
        elif isinstance(p, ChoiceParam):
            out[name] = CategoricalDistribution(p.choices)
        elif isinstance(p, FloatParam):
            out[name] = FloatDistribution(p.low, p.high, log=p.log)
        else:
            out[name] = IntDistribution(p.low, p.high, step=p.step, log=p.log)
    return out


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid without its stop at the last grid point: study.stop() works only inside study.optimize, and
    the sweep counts its trials itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def sampler(spec: SweepSpec, constraints=None):
    """Grid, TPE (constrained: `constraints(frozen_trial) -> [value, ...]`, <= 0 feasible) or random."""
    if spec.sampler == "grid":
        return GridSampler(spec.grid(), seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, constraints_func=constraints)


def pruner(spec: SweepSpec):
    """The Optuna pruner (NopPruner for none: Optuna's default would be a median one). Trials report the negated
    validation loss (the study maximises), so a threshold on the loss is a lower bound on what they report."""
    p = spec.pruner
    if isinstance(p, MedianPruner):
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                           interval_steps=p.interval_steps)
    if isinstance(p, ThresholdPruner):
        return optuna.pruners.ThresholdPruner(lower=-p.max_val_loss, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def every_trial(spec: SweepSpec, overrides: list[str]) -> list[str]:
    """What every trial sets before its own values: the space file's overrides, then the caller's (`--set`, the
    deployment form's), so the caller's win on a shared key."""
    return [*spec.overrides, *overrides]


def overrides(params: dict) -> list[str]:
    """A trial's sampled values as `--set` overrides (YAML scalars, so 1e-3 stays a float)."""
    return [f"{name}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for name, value in params.items()]
