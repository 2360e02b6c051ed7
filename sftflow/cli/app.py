"""The `sftflow` command line. Heavy libraries are imported only inside commands, after the
environment (state dir, offline mode) is set, so `--help` is instant and offline mode holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from sftflow import errors
from sftflow import metrics as names
from sftflow.cli.operations import ops
from sftflow.cli.history_command import history as history_command
from sftflow.cli.monitor_command import monitor as monitor_command
from sftflow.cli import terminal
from sftflow.cli.sweep_command import sweep as sweep_command
from sftflow.cli.terminal import RunOutput, console, err_console


class UserErrorsHandled(TyperGroup):
    """The one place user errors end: their message, where the traceback went, exit 2. Other errors are bugs
    and keep typer's traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except errors.UserError as exc:
            from sftflow.redact import scrub

            log = errors.write_log(exc, ctx.invoked_subcommand or "")
            if errors.DEBUG:
                err_console.print_exception()
            err_console.print(Text(f"error: {scrub(str(exc))}", style="red"), soft_wrap=True)
            err_console.print(Text(f"traceback: {log} (sftflow --debug shows it here)", style="dim"), soft_wrap=True)
            raise typer.Exit(errors.EXIT_USER_ERROR) from None


# Locals in tracebacks would print configs and environments, secrets included.
app = typer.Typer(cls=UserErrorsHandled, pretty_exceptions_show_locals=False, no_args_is_help=True,
                  help="sftflow: curate, split, template, fine-tune (TRL) and evaluate forgetting (lm-eval), "
                       "orchestrated by Prefect and tracked in MLflow.")
model_app = typer.Typer(help="Base models available offline (registry aliases).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(ops)  # servers, deployments, registry, comparison: top-level commands of their own module


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of user errors (and Prefect's "
                                                             "failure logs) on the terminal; implies --verbose")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every library's output during a run "
                                               "(by default one line per stage; the rest goes to the run's run.log)")]
         = False) -> None:
    terminal.VERBOSE = verbose or debug
    if debug:
        import os

        errors.DEBUG = True
        os.environ["SFTFLOW_DEBUG"] = "1"  # processes this one starts (training workers)

ConfigArg = Annotated[Path, typer.Argument(help="pipeline config YAML, e.g. configs/demo.yaml")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: key.path=value (repeatable)")]


def _load(config: Path, overrides: list[str] | None):
    from sftflow.configs.loader import load_config

    return load_config(config, overrides or [])


def print_summary(rows: list[dict], title: str) -> None:
    champ = any("vs_champion" in r for r in rows)
    table = Table(title=title)
    cols = ("measure", "base", *(["champion"] if champ else []), "fine-tuned", "delta", "95% CI", "p",
            *(["vs champion", "95% CI "] if champ else []), "n", "")
    for col in cols:
        table.add_column(col, justify="left" if col in ("measure", "") else "right")
    for r in rows:
        colour = "green" if r["delta"] > 0 else "red" if r["delta"] < 0 else "white"
        ci = "" if r.get("ci_low") is None else f"[{r['ci_low']:+.3f},{r['ci_high']:+.3f}]"
        p = "" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        cells = [r["measure"], f"{r['base']:.3f}"]
        cells += [f"{r['champion']:.3f}" if r.get("champion") is not None else ""] if champ else []
        cells += [f"{r['fine-tuned']:.3f}", f"[{colour}]{r['delta']:+.3f}[/{colour}]", ci, p]
        if champ:
            low, high = r.get("vs_champion_ci") or (None, None)
            cells += [f"{r['vs_champion']:+.3f}" if "vs_champion" in r else "",
                      "" if low is None else f"[{low:+.3f},{high:+.3f}]"]
        table.add_row(*cells, str(r["n"]), r.get("flag", ""))
    console.print(table)


def register_run(cfg, result: dict) -> str:
    """Register the run's candidate -> the line saying what it became."""
    from sftflow.flows.retrain import register as register_candidate
    from sftflow.release.registry import champion

    version = register_candidate(cfg, result)
    now = champion(cfg.name)
    role = "champion" if now and now.version == version.version else "challenger"
    return (f"registered {cfg.name} v{version.version} as {role}"
            + (f" (champion: v{now.version})" if role == "challenger" and now else "")
            + f"; load it with mlflow.pyfunc.load_model('models:/{cfg.name}@{role}')")


@app.command()
def run(config: ConfigArg, set_: SetOpt = None,
        register: Annotated[bool, typer.Option(help="register the candidate as a version of the config's name: "
                                                    "the gate (against the base and the champion) decides "
                                                    "whether it becomes champion")] = False) -> None:
    """Run the whole pipeline (a Prefect flow; local Prefect and MLflow unless configured otherwise)."""
    terminal.quiet_prefect()
    import os
    import time

    from sftflow import env

    cfg = _load(config, set_)
    from sftflow.stack import servers

    record = servers.use()  # after `sftflow up`, runs show in its Prefect and MLflow UIs
    state = env.configure(cfg.offline)
    from sftflow.flows.sft_pipeline import sft_pipeline
    from sftflow.redact import scrub

    start = time.perf_counter()
    registered = None
    with RunOutput("run") as output:
        result = sft_pipeline(config=cfg)
        output.run_dir = result["run_dir"]
        if register:  # inside: registering logs (packaging the model) into the run's log too
            registered = register_run(cfg, result)
    print_summary(result["rows"], f"sftflow {cfg.name}: base vs fine-tuned")
    gate = result["gate"]
    console.print(f"promotion gate: {'[green]passed' if gate['passed'] else '[red]failed'}[/] "
                  f"({'; '.join(gate['reasons'])})")
    console.print(result["eval_timing"])
    if registered:
        console.print(registered, soft_wrap=True)
    console.print(f"wall time {time.perf_counter() - start:.0f} s; run dir {result['run_dir']}"
                  + ("" if terminal.VERBOSE else f"; log {output.log_path}"), soft_wrap=True)
    if record:
        console.print(f"MLflow run {result['mlflow_run_id']}: {record['mlflow_url']}   Prefect: {record['prefect_url']}")
        return
    uri = scrub(os.environ["MLFLOW_TRACKING_URI"])
    console.print(f"MLflow run {result['mlflow_run_id']} in {uri}\n"
                  f"  browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1\n"
                  f"  Prefect: PREFECT_HOME={state / 'prefect'} prefect server start --host 127.0.0.1")


@app.command()
def curate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Run only the data stage (load, pre-flight, filters, dedup, split, decontamination); print its report."""
    terminal.quiet_prefect()
    from rich.markdown import Markdown

    from sftflow import env

    cfg = _load(config, set_)
    env.configure(cfg.offline)
    from sftflow.flows.sft_pipeline import curate_pipeline

    with RunOutput("curate") as output:
        result = curate_pipeline(config=cfg)
        output.run_dir = result["run_dir"]
    console.print(Markdown(result["report_md"]))
    console.print(f"splits: {', '.join(result['paths'].values())}\nMLflow run {result['mlflow_run_id']}",
                  soft_wrap=True)  # paths stay whole, to copy


@app.command("eval")
def eval_(config: ConfigArg,
          model: Annotated[str, typer.Option("--model", "-m", help="registry alias, model folder, LoRA adapter "
                                             "folder (on the config's model.base), .gguf file or hub id")],
          baseline: Annotated[bool, typer.Option(help="also sweep the config's model.base (cached) and report "
                                                      "forgetting with CIs")] = False,
          set_: SetOpt = None) -> None:
    """Run only the benchmark sweep (eval.mmlu, eval.bbh, eval.tasks) for one model, tracked in MLflow."""
    terminal.quiet_prefect()
    from sftflow import env

    cfg = _load(config, set_)
    env.configure(cfg.offline)
    from sftflow.flows.evaluate import evaluate_model

    with RunOutput("eval") as output:
        result = evaluate_model(config=cfg, model=model, baseline=baseline)
        output.run_dir = result["run_dir"]
    print_sweep(result, result["models"], f"sftflow eval {model}")
    console.print(f"run dir {result['run_dir']}; MLflow run {result['mlflow_run_id']}; "
                  "lm-eval wall time " + ", ".join(
                      f"{t} {result['metrics'][names.eval_work(t, 'wall_s')]:.0f} s "
                      f"({result['metrics'][names.eval_work(t, 'cached_tasks')]:.0f} tasks cached)"
                      for t in result["models"]))


def print_sweep(result: dict, tags: list[str], title: str) -> None:
    """Benchmark and category scores per model; with a base, the forgetting columns too."""
    compared = {r["name"]: r for r in result.get("forgetting", {}).get("model", []) if r["scope"] != "subtask"}
    table = Table(title=title)
    for col in ("measure", *tags, *(("delta", "95% CI", "p", "") if compared else ())):
        table.add_column(col, justify="left" if col in ("measure", "") else "right")
    for name in sorted(result["metrics"]):
        score = names.parse_eval(name)  # the swept model's benchmark and category scores
        if score is None or score.tag != "model" or score.subtask or score.count:
            continue
        row = [f"{score.scope}/{score.metric}"]
        row += [f"{result['metrics'][names.eval_score(t, score.scope, score.metric)]:.3f}" for t in tags]
        if score.scope in compared:
            fg = compared[score.scope]
            row += [f"{fg['delta']:+.3f}", f"[{fg['ci_low']:+.3f},{fg['ci_high']:+.3f}]", f"{fg['p_value']:.3g}",
                    "significant drop" if fg["significant_drop"] else ""]
        table.add_row(*row)
    console.print(table)


@app.command("config")
def show_config(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate a config with its overrides and print the resolved result."""
    import yaml

    cfg = _load(config, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)
    console.print(f"# config hash {cfg.digest()}")


@model_app.command("pull")
def model_pull(name: Annotated[str, typer.Argument(help="registry alias, e.g. smollm2-135m-instruct")],
               force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False) -> None:
    """Fetch and convert a registry model into <state>/models (checksum-verified, safetensors)."""
    from sftflow import env

    env.configure(offline=True)
    from sftflow.models import pull

    path = pull(name, force=force)
    console.print(f"{name}: {path}")


@model_app.command("list")
def model_list() -> None:
    """List registry aliases and whether each is already built."""
    from sftflow.models import MANIFEST, models_dir, registry

    for name, spec in registry().items():
        built = (models_dir() / name / MANIFEST).exists()
        console.print(f"{name:28s} {spec['kind']:12s} {'built' if built else 'not built'}")



app.command("monitor")(monitor_command)
app.command("history")(history_command)
app.command("sweep")(sweep_command)

if __name__ == "__main__":
    app()
