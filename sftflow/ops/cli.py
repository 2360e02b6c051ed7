"""The `sftflow` command line. Heavy libraries are imported only inside commands, after the
environment (state dir, offline mode) is set, so `--help` is instant and offline mode holds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from sftflow import errors
from sftflow.ops.monitor_cli import monitor as monitor_command

# Logs and CI have no terminal: rich would fold tables to 80 columns and cut the CIs.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


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


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of user errors (and Prefect's "
                                                             "failure logs) on the terminal")] = False) -> None:
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
    table = Table(title=title)
    for col in ("measure", "base", "fine-tuned", "delta", "95% CI", "p", "n", ""):
        table.add_column(col, justify="left" if col in ("measure", "") else "right")
    for r in rows:
        colour = "green" if r["delta"] > 0 else "red" if r["delta"] < 0 else "white"
        ci = "" if r.get("ci_low") is None else f"[{r['ci_low']:+.3f},{r['ci_high']:+.3f}]"
        p = "" if r.get("p_value") is None else f"{r['p_value']:.3g}"
        table.add_row(r["measure"], f"{r['base']:.3f}", f"{r['fine-tuned']:.3f}",
                      f"[{colour}]{r['delta']:+.3f}[/{colour}]", ci, p, str(r["n"]), r.get("flag", ""))
    console.print(table)


@app.command()
def run(config: ConfigArg, set_: SetOpt = None) -> None:
    """Run the whole pipeline (a Prefect flow; local Prefect and MLflow unless configured otherwise)."""
    import os
    import time

    from sftflow import env

    cfg = _load(config, set_)
    from sftflow.ops import servers

    record = servers.use()  # after `sftflow up`, runs show in its Prefect and MLflow UIs
    state = env.configure(cfg.offline)
    from sftflow.flows.sft_pipeline import sft_pipeline
    from sftflow.redact import scrub

    start = time.perf_counter()
    result = sft_pipeline(config=cfg)
    print_summary(result["rows"], f"sftflow {cfg.name}: base vs fine-tuned")
    gate = result["gate"]
    console.print(f"promotion gate: {'[green]passed' if gate['passed'] else '[red]failed'}[/] "
                  f"({'; '.join(gate['reasons'])})")
    console.print(result["eval_timing"])
    console.print(f"wall time {time.perf_counter() - start:.0f} s; run dir {result['run_dir']}")
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
    from rich.markdown import Markdown

    from sftflow import env

    cfg = _load(config, set_)
    env.configure(cfg.offline)
    from sftflow.flows.sft_pipeline import curate_pipeline

    result = curate_pipeline(config=cfg)
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
    import uuid

    from sftflow import env

    cfg = _load(config, set_)
    state = env.configure(cfg.offline)
    from sftflow.tasks.evaluation.benchmarks import benchmarks, sweep_models
    from sftflow.tracking import parent_run, run_stage

    models = sweep_models(model, cfg.model.base, cfg.offline, baseline)
    with parent_run(cfg, state, "none (sftflow eval)", f"eval-{uuid.uuid4().hex[:8]}") as ctx:
        result = run_stage("benchmarks", benchmarks, ctx, models, cfg.eval,
                           trust_remote_code=cfg.model.trust_remote_code)
    print_sweep(result, list(models), f"sftflow eval {model}")
    console.print(f"run dir {ctx.run_dir}; MLflow run {ctx.parent_run_id}; "
                  "lm-eval wall time " + ", ".join(f"{t} {result['metrics'][f'eval/{t}/wall_s']:.0f} s "
                                                   f"({result['metrics'][f'eval/{t}/cached_tasks']:.0f} tasks cached)"
                                                   for t in models))


def print_sweep(result: dict, tags: list[str], title: str) -> None:
    """Benchmark and category scores per model; with a base, the forgetting columns too."""
    compared = {r["name"]: r for r in result.get("forgetting", {}).get("model", []) if r["scope"] != "subtask"}
    table = Table(title=title)
    for col in ("measure", *tags, *(("delta", "95% CI", "p", "") if compared else ())):
        table.add_column(col, justify="left" if col in ("measure", "") else "right")
    for name in sorted(result["metrics"]):
        parts = name.split("/")  # eval/model/<benchmark or category>/<metric>
        if parts[:2] != ["eval", "model"] or len(parts) != 4 or parts[3] in ("n", "wall_s"):
            continue
        measure = "/".join(parts[2:])
        row = [measure] + [f"{result['metrics'][f'eval/{t}/{measure}']:.3f}" for t in tags]
        if parts[2] in compared:
            fg = compared[parts[2]]
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



# --- operations: servers, deployments, registry, comparison (issue 6) ---

PortOpt = Annotated[int, typer.Option(help="0: pick a free port")]


def _connect() -> dict | None:
    """Use the servers `sftflow up` started, if they run; then the state dir and offline mode."""
    from sftflow import env
    from sftflow.ops import servers

    record = servers.use()
    env.configure(offline=True)
    return record


@app.command()
def up(prefect_port: PortOpt = 0, mlflow_port: PortOpt = 0,
       pool: Annotated[str, typer.Option(help="Prefect process work pool the worker serves")] = "sftflow",
       backend_store_uri: Annotated[Optional[str], typer.Option(
           help="MLflow backend store (default: SQLite in the state dir), e.g. postgresql://...")] = None,
       artifact_root: Annotated[Optional[str], typer.Option(
           help="MLflow artifact root (default: <state>/mlartifacts), e.g. s3://bucket/path")] = None) -> None:
    """Start a Prefect server, an MLflow tracking server and a Prefect worker (127.0.0.1); wait until healthy."""
    from sftflow.ops import servers

    record = servers.up(prefect_port, mlflow_port, pool, backend_store_uri, artifact_root)
    _print_status(record)
    console.print(f"Prefect UI {record['prefect_url']}   MLflow UI {record['mlflow_url']}\n"
                  f"other tools: export PREFECT_API_URL={record['api_url']} MLFLOW_TRACKING_URI={record['mlflow_url']}")


def _print_status(record: dict | None) -> None:
    if record is None:
        console.print("no servers started by `sftflow up` (state: nothing recorded)")
        return
    table = Table(title=f"sftflow servers (logs in {Path(record['services']['prefect']['log']).parent})")
    for col in ("service", "pid", "running", "healthy", "url"):
        table.add_column(col)
    urls = {"prefect": record["prefect_url"], "mlflow": record["mlflow_url"], "worker": f"pool {record['pool']}"}
    for name, entry in record["services"].items():
        table.add_row(name, str(entry["pid"]), "yes" if entry["running"] else "[red]no[/red]",
                      "yes" if entry["healthy"] else "[red]no[/red]", urls[name])
    console.print(table)


@app.command()
def down() -> None:
    """Stop exactly what `sftflow up` started (with its child processes)."""
    from sftflow.ops import servers

    stopped = servers.down()
    console.print(f"stopped {len(stopped)} processes" if stopped else "nothing to stop")


@app.command()
def status() -> None:
    """Show what `sftflow up` started, whether each process runs and answers."""
    from sftflow.ops import servers

    record = servers.status()
    _print_status(record)
    if record and not all(e["healthy"] for e in record["services"].values()):
        raise typer.Exit(1)


@app.command()
def deploy(file: Annotated[Path, typer.Option(help="deployment definitions")] = Path("deployments/deployments.yaml"),
           pool: Annotated[Optional[str], typer.Option(help="work pool (default: the one `up` started)")] = None,
           config: Annotated[Optional[str], typer.Option(help="default config file of every deployment")] = None,
           cron: Annotated[Optional[str], typer.Option(help="replace the scheduled deployments' cron")] = None,
           image: Annotated[Optional[str], typer.Option(help="container image (Kubernetes pools)")] = None) -> None:
    """Create or update the Prefect deployments (ad-hoc and nightly retraining) on the running server."""
    record = _connect()
    from sftflow.ops.deploy import apply, load_specs

    if record is None and pool is None:
        raise errors.UserError("no servers running: `sftflow up` first, or set PREFECT_API_URL and --pool")
    for name, dep_id in apply(load_specs(file), pool or record["pool"], config, cron, image).items():
        console.print(f"deployment {name}: {dep_id}")
    if record:
        console.print(f"Prefect UI: {record['prefect_url']}/deployments")


ModelName = Annotated[str, typer.Argument(help="registered model = pipeline config name, e.g. demo")]


def _print_version(v, what: str) -> None:
    console.print(f"{v.name}: champion is now v{v.version} ({what}); gate.passed={v.tags.get('gate.passed')}, "
                  f"run {v.run_id}")


@app.command()
def promote(name: ModelName,
            version: Annotated[Optional[str], typer.Argument(help="version (default: the challenger)")] = None) -> None:
    """Point the `champion` alias at a version (a human override of the promotion gate)."""
    _connect()
    from sftflow.ops import registry

    _print_version(registry.promote(name, version), "promoted")


@app.command()
def rollback(name: ModelName) -> None:
    """Move `champion` back to the version it replaced."""
    _connect()
    from sftflow.ops import registry

    _print_version(registry.rollback(name), "rolled back")


RefsArg = Annotated[list[str], typer.Argument(help="MLflow run ids and/or experiment names (all their runs)")]


@app.command()
def compare(refs: RefsArg,
            out: Annotated[Optional[Path], typer.Option(help="report folder (default <state>/reports/compare-<time>)")] = None
            ) -> None:
    """Compare pipeline runs: config differences, target gain, forgetting, train loss, wall time; writes a report."""
    import time

    from sftflow import env
    from sftflow.ops import compare as cmp

    _connect()
    runs = cmp.views(refs)
    headers, rows = cmp.table(runs)
    table = Table(title="sftflow compare")
    table.add_column("")
    for h in headers:
        table.add_column(h, justify="right")
    for label, values in rows:
        table.add_row(label, *(cmp.fmt(v, label) for v in values))
    console.print(table)
    paths = cmp.write_report(runs, out or env.state_dir() / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    console.print(f"report: {paths['markdown']} and {paths['html']}")


@app.command()
def screenshots(refs: Annotated[Optional[list[str]], typer.Argument(
                    help="MLflow runs/experiments for the comparison view (default: the two latest runs)")] = None,
                flow_run: Annotated[Optional[str], typer.Option(help="Prefect flow run id (default: latest)")] = None,
                out: Annotated[Path, typer.Option(help="folder for the PNGs")] = Path("screenshots")) -> None:
    """Screenshot the Prefect flow-run page and the MLflow comparison view (needs `sftflow up`, chromium)."""
    record = _connect()
    if record is None:
        raise errors.UserError("no servers running: `sftflow up` first")
    from sftflow.ops.shots import take

    for path in take(record, refs or [], flow_run, out):
        console.print(f"wrote {path}")


app.command("monitor")(monitor_command)

if __name__ == "__main__":
    app()
