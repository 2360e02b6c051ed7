"""A sweep trial's pruning: a Trainer callback that reports each validation loss to the trial's Optuna pruner and
stops the training when the pruner gives up on it.

Set through sftflow.hooks.train_callbacks around the trial's pipeline; raising hooks.TrainingPruned stops the
training before its checkpoint at that step, caches nothing, ends the trial's MLflow runs KILLED (tag
sftflow.pruned) and skips the evaluation stages. Optuna maximises the sweep's gain, so the trial reports the
negated loss: lower loss, higher value.
"""

from __future__ import annotations

from sftflow.hooks import TrainingPruned


def val_loss_reporter(trial):
    """-> a TrainerCallback for `trial`; its `pruned` is {"step", "val_loss"} once it stopped the training."""
    from transformers import TrainerCallback

    class ValLossReporter(TrainerCallback):
        pruned: dict | None = None

        def __init__(self):
            self.reported: set[int] = set()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss, step = (metrics or {}).get("eval_loss"), state.global_step
            # The stage's last evaluate() repeats the last validation step (the best model): reported already.
            if loss is None or step in self.reported:
                return
            self.reported.add(step)
            trial.report(-float(loss), step)
            if trial.should_prune():
                self.pruned = {"step": step, "val_loss": float(loss)}
                raise TrainingPruned(f"pruned at step {step}: validation loss {float(loss):.4g}")

    return ValLossReporter()
