"""Every chart sftflow draws (matplotlib, headless Agg backend): forgetting deltas, training curves, run comparisons."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    """pyplot on the headless backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SCOPE_COLOURS = {"benchmark": "tab:blue", "category": "lightsteelblue", "subtask": "tab:gray"}


def plot_deltas(rows: list[dict], path: Path, title: str) -> list[Path]:
    """Forgetting rows (scope benchmark, category or subtask) -> `path`: the benchmarks and categories, whose
    CIs rest on every item; `<path stem>_subtasks.png`: the subtasks (a few items each, so wide CIs), kept apart so
    they do not outweigh the totals. -> the charts written."""
    totals = [r for r in rows if r["scope"] != "subtask"]
    subtasks = [r for r in rows if r["scope"] == "subtask"]
    written = [_delta_bars(totals or subtasks, path, title)]
    if totals and subtasks:
        written.append(_delta_bars(subtasks, subtask_chart(path), f"{title}: subtasks"))
    return written


def subtask_chart(path: Path) -> Path:
    return path.with_name(f"{path.stem}_subtasks{path.suffix}")


def _delta_bars(rows: list[dict], path: Path, title: str) -> Path:
    """Horizontal bars of delta with 95% CI whiskers, one per row; significant drops in red."""
    plt = _pyplot()

    rows = list(reversed(rows))  # first row on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * max(len(rows), 3)))
    ys = range(len(rows))
    deltas = [r["delta"] for r in rows]
    errs = [[r["delta"] - r["ci_low"] for r in rows], [r["ci_high"] - r["delta"] for r in rows]]
    colours = ["tab:red" if r["significant_drop"] else SCOPE_COLOURS.get(r["scope"], "tab:gray") for r in rows]
    ax.barh(list(ys), deltas, xerr=errs, color=colours, ecolor="black", capsize=2, height=0.7)
    ax.set_yticks(list(ys), [f"{r['name']} (n={r['n']})" for r in rows], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("delta (fine-tuned minus base); whiskers: 95% paired-bootstrap CI; red: significant drop")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: list[dict], path: Path) -> None:
    plt = _pyplot()

    panels = (("loss", ("loss", "eval_loss")), ("learning rate", ("learning_rate",)), ("grad norm", ("grad_norm",)))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.5))
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set_xlabel("step"), ax.set_ylabel(label)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(fig, ax, path: Path) -> Path:
    plt = _pyplot()
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run_deltas(run_names: list[str], rows: list[tuple[str, list]], path: Path) -> Path:
    """Grouped bars, one group per (label, one value per run) row, one bar per run (missing values as 0)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(run_names)
    for i, name in enumerate(run_names):
        ax.bar([j + i * width for j in range(len(rows))], [v[i] or 0.0 for _, v in rows], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [label for label, _ in rows], rotation=20)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("fine-tuned − base")
    ax.set_title("target gain and forgetting")
    return _save(fig, ax, path)


def plot_loss_curves(curves: list[tuple[str, list[tuple[int, float]]]], path: Path) -> Path:
    """One train-loss line per (run name, [(step, loss), ...])."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves:
        ax.plot(*zip(*curve), marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    return _save(fig, ax, path)


def plot_pareto(points: list[dict], path: Path, max_drop: float | None = None) -> Path:
    """Sweep trials as (worst forgetting, gain) points, labelled by trial number; the Pareto front joined by a
    line; gate passes filled green; `max_drop`: the gate's forgetting allowance as a dashed line."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        ax.scatter(p["worst_forgetting"], p["gain"], s=40, color="tab:green" if p["passed"] else "tab:gray",
                   edgecolors="black" if p["pareto"] else "none", zorder=3)
        ax.annotate(str(p["trial"]), (p["worst_forgetting"], p["gain"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=8)
    if front := sorted((p["worst_forgetting"], p["gain"]) for p in points if p["pareto"]):
        ax.plot(*zip(*front), color="tab:blue", linewidth=1, label="Pareto front")
    if max_drop is not None:
        ax.axvline(max_drop, color="tab:red", linestyle="--", linewidth=0.8, label="gate: largest drop allowed")
    ax.set_xlabel("worst forgetting (largest benchmark drop, base − fine-tuned)")
    ax.set_ylabel("held-out gain (fine-tuned − base)")
    ax.set_title("sweep: gain vs forgetting (green: passes the gate)")
    return _save(fig, ax, path)
