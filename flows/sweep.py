"""Hyperparameter sweep under the forgetting constraint: trials are SFT pipeline subflows, searched by Optuna.

config + space file -> Optuna study (grid, TPE constrained on forgetting, or random; SQLite beside the MLflow
store) -> each trial: the space's values as overrides -> sft_pipeline nested under the sweep's MLflow run ->
scored with the gate's measures, or pruned on validation loss during training (sweeps.prune) -> Pareto table and
plot, the best trial that passes the gate (registered as challenger on request). The data stages and the base
model's benchmarks come from the caches after trial one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from threading import Lock

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from sftflow import charts, hooks
from sftflow.flows.retrain import PACKAGED_CONFIGS, config_path, fingerprint, resolve_config
from sftflow.release import registry
from sftflow.stack.entry import FlowEntry
from sftflow.stack.fence import FenceError
from sftflow.sweeps import pareto
from sftflow.sweeps import prune
from sftflow.sweeps import space
from sftflow.sweeps import study as study_state


def _trial_config(config_file: str, base_overrides: list[str], params: dict, entry: FlowEntry):
    cfg = resolve_config(config_file, [*base_overrides, *space.overrides(params)], None, None, None)
    entry.check(cfg)  # a trial's values are form input too: the deployment's fence holds for each of them
    return cfg


def judged_against(run) -> dict | None:
    """The champion a pipeline run was judged against ({"version"}), from its tag; None: the base only."""
    judged = run.data.tags.get("sftflow.judged_against", "base")
    return {"version": judged[1:]} if judged.startswith("v") else None


def run_trial(study, spec: space.SweepSpec, config_file: str, base_overrides: list[str], sweep_run_id: str,
              entry: FlowEntry, state_dir) -> dict:
    """Ask Optuna for a trial, run the pipeline on its values, tell the score; a crash is recorded, not raised."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from sftflow.flows.sft_pipeline import sft_pipeline

    logger = get_run_logger()
    trial = study.ask(space.distributions(spec))
    study_state.claim(trial)
    params, run_id = dict(trial.params), None
    reporter = None if spec.pruner.type == "none" else prune.val_loss_reporter(trial)
    try:
        cfg = _trial_config(config_file, base_overrides, params, entry)
        hook = hooks.train_callbacks.set((reporter,) if reporter else ())
        try:
            state = sft_pipeline.with_options(flow_run_name=f"{study.study_name}-trial-{trial.number}")(
                config=cfg, nest_under=sweep_run_id, return_state=True)
        finally:
            hooks.train_callbacks.reset(hook)
        found = MlflowClient().search_runs([study_state.open_experiment(cfg, state_dir)], max_results=1,
                                           filter_string=f"tags.`prefect.flow_run_id` = "
                                                         f"'{state.state_details.flow_run_id}'")
        run_id = found[0].info.run_id if found else None
        pruned = reporter.pruned if reporter is not None and not state.is_completed() else None
        if not state.is_completed() and not pruned:
            raise RuntimeError(f"pipeline {state.name}: {state.message}")
        scored = None if pruned else pareto.score(found[0].data.metrics, cfg.gate, judged_against(found[0]))
        if scored and scored["gain"] is None:
            raise RuntimeError("; ".join(scored["reasons"]))
    except FenceError:
        study.tell(trial, state=TrialState.FAIL)
        raise  # a value the deployment does not allow stops the sweep
    except Exception as exc:  # one trial's failure is that trial's outcome; the sweep goes on
        logger.warning(f"trial {trial.number} {params} failed: {exc}")
        trial.set_user_attr("error", str(exc)[:1000])
        if run_id:
            trial.set_user_attr(study_state.RUN_ID, run_id)
            study_state.record_trial(run_id, trial.number, study.study_name, params, None, "fail")
        study.tell(trial, state=TrialState.FAIL)
        return {"trial": trial.number, "params": params, "state": "FAIL", "run_id": run_id, "error": str(exc)}
    if pruned:  # an outcome, not a failure: Optuna's samplers learn from it, the evaluation stages never ran
        trial.set_user_attr("pruned", pruned)
        if run_id:
            trial.set_user_attr(study_state.RUN_ID, run_id)
            study_state.record_trial(run_id, trial.number, study.study_name, params, None, "pruned")
        study.tell(trial, state=TrialState.PRUNED)
        logger.warning(f"trial {trial.number} {params} pruned at step {pruned['step']}: validation loss "
                       f"{pruned['val_loss']:.4g}")
        return {"trial": trial.number, "params": params, "state": "PRUNED", "run_id": run_id, **pruned}
    for key in (*study_state.SCORE_KEYS, "constraints"):
        trial.set_user_attr(key, scored[key])
    trial.set_user_attr(study_state.RUN_ID, run_id)
    study_state.record_trial(run_id, trial.number, study.study_name, params, scored, "complete")
    study.tell(trial, scored["gain"])
    logger.info(f"trial {trial.number} {params}: gain {pareto.fmt(scored['gain'], True)}, worst forgetting "
                f"{pareto.fmt(scored['worst_forgetting'], True)}, gate {'passed' if scored['passed'] else 'failed'}")
    return {"trial": trial.number, "params": params, "state": "COMPLETE", "run_id": run_id, **scored}


def run_trials(todo: int, concurrency: int, run_one) -> None:
    """`todo` trials, at most `concurrency` at once (threads, each subflow in a copy of this flow's context)."""
    if concurrency <= 1:
        for _ in range(todo):
            run_one()
        return
    lock, left = Lock(), [todo]

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            run_one()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for job in [pool.submit(copy_context().run, worker) for _ in range(concurrency)]:
            job.result()


def publish(results: list[dict], spec: space.SweepSpec, base_cfg, sweep_run_id: str, run_dir) -> dict:
    """Pareto table (markdown) and plot into run_dir, logged on the sweep run with its summary metrics."""
    import mlflow

    front = pareto.pareto_front(results)
    for r in results:
        r["pareto"] = any(r is f for f in front)
    best = pareto.best(results)
    md = pareto.table(results, list(spec.params))
    (run_dir / "pareto.md").write_text(md)
    scored = [r for r in results if r.get("gain") is not None and r.get("worst_forgetting") is not None]
    allowances = list(base_cfg.gate.max_forgetting.values())
    paths = [run_dir / "pareto.md"]
    if scored:
        paths.append(charts.plot_pareto(scored, run_dir / "pareto.png", min(allowances) if allowances else None))
    client = mlflow.MlflowClient()
    for p in paths:
        client.log_artifact(sweep_run_id, str(p))
    summary = {"sweep/n_trials": len(results), "sweep/n_failed": sum(r["state"] == "FAIL" for r in results),
               "sweep/n_pruned": sum(r["state"] == "PRUNED" for r in results),
               "sweep/n_passed": sum(bool(r.get("passed")) for r in results), "sweep/n_pareto": len(front)}
    if best:
        summary |= {"sweep/best_trial": best["trial"], "sweep/best_gain": best["gain"],
                    "sweep/best_worst_forgetting": best["worst_forgetting"]}
        client.set_tag(sweep_run_id, "sftflow.sweep_best_run", best["run_id"])
    for key, value in summary.items():
        client.log_metric(sweep_run_id, key, float(value))
    return {"table": md, "front": front, "best": best, "plot": str(run_dir / "pareto.png") if scored else None}


@flow(name="sftflow-sweep")
def sweep(config_file: str = "configs/demo.yaml", space_file: str = "configs/sweep_demo.yaml",
          n_trials: int | None = None, overrides: list[str] | None = None, register_best: bool = False) -> dict:
    """Search hyperparameters for the largest held-out gain without forgetting beyond the gate's allowance.

    Args:
        config_file: pipeline config YAML (relative to the worker's project directory, or a shipped one by name)
        space_file: sweep space YAML (sampler, params, n_trials, overrides, concurrency)
        n_trials: trials in all, replacing the space file's (a resumed sweep runs only the missing ones)
        overrides: `key.path=value` overrides for every trial, as `sftflow run --set` takes them
        register_best: register the best trial that passes the gate as `challenger`
    """
    logger = get_run_logger()
    entry = FlowEntry()
    entry.check_files(config_path(config_file), config_path(space_file), shipped=PACKAGED_CONFIGS)
    spec = space.load_spec(config_path(space_file), n_trials)
    base_overrides = space.every_trial(spec, overrides or [])
    base = _trial_config(config_file, base_overrides, {}, entry)
    state = entry.admit(base)
    name = study_state.study_name(base, spec)
    study = study_state.open_study(name, spec, state)
    if redo := study_state.requeue_stale(study):
        logger.info(f"trials {redo} were left running by a killed sweep: marked FAIL and queued again")
    sweep_run_id, _ = study_state.sweep_run(study, base, spec, state, config_file)
    start, done = time.perf_counter(), len(study_state.finished(study))
    todo = max(0, spec.trials() - done)
    logger.info(f"sweep {name}: {done} trial(s) finished before, {todo} to run; MLflow run {sweep_run_id}")
    if spec.pruner.type != "none" and base.train.launcher.kind != "inprocess":
        logger.warning("pruning needs train.launcher.kind=inprocess (workers run no callbacks of this process): "
                       "every trial trains to the end")
    try:
        run_trials(todo, spec.concurrency,
                   lambda: run_trial(study, spec, config_file, base_overrides, sweep_run_id, entry, state))
        run_dir = state / "sweeps" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        results = study_state.records(study)
        out = publish(results, spec, base, sweep_run_id, run_dir)
    except BaseException:
        import mlflow

        mlflow.MlflowClient().set_terminated(sweep_run_id, "FAILED")
        raise
    version = None
    if register_best and out["best"]:
        best = out["best"]
        cfg = _trial_config(config_file, base_overrides, best["params"], entry)
        from mlflow.tracking import MlflowClient

        run = MlflowClient().get_run(best["run_id"])  # its verdict again, with the champion it was judged against
        scored = pareto.score(run.data.metrics, cfg.gate, judged_against(run))
        version = registry.register_candidate(
            cfg.name, best["run_id"], {"passed": scored["passed"], "champion": scored["champion"],
                                       "reasons": [f"best of sweep {name}", *scored["reasons"]]}, fingerprint(cfg),
            {"gain": round(best["gain"], 4), "worst_forgetting": round(best["worst_forgetting"], 4)},
            promote=False).version
    import mlflow

    mlflow.MlflowClient().set_terminated(sweep_run_id, "FINISHED")
    best = out["best"]
    best_line = (f"best trial passing the gate: **{best['trial']}** {best['params']} (gain {best['gain']:+.4f}, "
                 f"worst forgetting {best['worst_forgetting']:+.4f}, MLflow run `{best['run_id']}`)"
                 + (f", registered as `{base.name}` v{version} (challenger)" if version else "")
                 if best else "no trial passes the gate")
    create_markdown_artifact(key="sftflow-sweep", markdown=f"## sweep `{name}`\n\n{best_line}\n\n{out['table']}",
                             description="sweep trials: gain vs worst forgetting, Pareto front, gate")
    return {"study": name, "mlflow_run_id": sweep_run_id, "results": results, "best": best,
            "front": [r["trial"] for r in out["front"]], "table": out["table"], "plot": out["plot"],
            "registered_version": version, "ran": todo, "wall_s": time.perf_counter() - start}
