"""Every chart sftflow draws (matplotlib, headless Agg backend): forgetting deltas, training curves, run comparisons."""

from __future__ import annotations

from pathlib import Path


def plot_deltas(rows: list[dict], path: Path, title: str) -> Path:
    """Horizontal bars of delta with 95% CI whiskers, one per row; significant drops in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(rows))  # first row on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * len(rows)))
    ys = range(len(rows))
    deltas = [r["delta"] for r in rows]
    errs = [[r["delta"] - r["ci_low"] for r in rows], [r["ci_high"] - r["delta"] for r in rows]]
    colours = ["tab:red" if r["significant_drop"] else "tab:blue" if r["scope"] != "subtask" else "tab:gray"
               for r in rows]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

