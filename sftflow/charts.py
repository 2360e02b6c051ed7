"""Charts logged as artifacts (matplotlib, headless)."""

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
