"""Paired statistics for base vs fine-tuned comparisons on the same items.

Both models answer the same items, so every comparison is paired: the confidence interval comes from a
paired bootstrap over items (resample items, recompute the mean difference), and the significance test
is McNemar's exact test on the discordant pairs when scores are 0/1 (a Wilcoxon signed-rank test
otherwise). Many subtasks tested at once get Holm-adjusted p-values so 57 MMLU subjects do not raise
false alarms by chance. The minimum detectable effect (MDE) says how large a difference the paired test
could have found at 80% power, so "no significant drop" can be read as "no drop larger than the MDE".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n: int, iters: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile CI of `statistic` over item resamples; statistic maps an index matrix (B, n) to (B,) values."""
    if n == 0:
        raise ValueError("bootstrap_ci: no items")
    rng = np.random.default_rng(seed)
    values = np.empty(iters)
    for start in range(0, iters, 256):  # chunks keep memory flat for large item counts
        stop = min(iters, start + 256)
        values[start:stop] = statistic(rng.integers(0, n, size=(stop - start, n)))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(base: Sequence[float], ft: Sequence[float], iters: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile CI of mean(ft - base), resampling items with replacement (pairs stay together)."""
    diff = np.asarray(ft, dtype=float) - np.asarray(base, dtype=float)
    return bootstrap_ci(lambda idx: diff[idx].mean(axis=1), diff.size, iters, level, seed)


def unpaired_delta_ci(reference_scores: np.ndarray, new_scores: np.ndarray, iters: int,
                      seed: int) -> tuple[float, float]:
    """Percentile 95% CI of mean(new) - mean(reference), each sample resampled on its own."""
    rng = np.random.default_rng(seed)
    ref = reference_scores[rng.integers(0, reference_scores.size, (iters, reference_scores.size))].mean(axis=1)
    new = new_scores[rng.integers(0, new_scores.size, (iters, new_scores.size))].mean(axis=1)
    low, high = np.percentile(new - ref, [2.5, 97.5])
    return float(low), float(high)


def macro_f1(truth: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 over class ids 0..classes-1 along the last axis (works on a (B, n) stack of resamples);
    a class with no true and no predicted items scores 0, as sklearn's zero_division=0."""
    scores = []
    for c in range(classes):
        t, p = truth == c, pred == c
        tp, fp, fn = (t & p).sum(-1), (~t & p).sum(-1), (t & ~p).sum(-1)
        denom = 2 * tp + fp + fn
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(scores, axis=0)


def macro_f1_delta_ci(truth: Sequence[int], base: Sequence[int], ft: Sequence[int], classes: int,
                      iters: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Paired-bootstrap CI of macro-F1(ft) - macro-F1(base); labels as class ids (other answers: -1)."""
    t, b, f = (np.asarray(a) for a in (truth, base, ft))
    return bootstrap_ci(lambda idx: macro_f1(t[idx], f[idx], classes) - macro_f1(t[idx], b[idx], classes),
                        t.size, iters, level, seed)


def mcnemar_exact(base: Sequence[float], ft: Sequence[float]) -> dict:
    """Exact McNemar test on 0/1 scores: b = only base right, c = only fine-tuned right."""
    b_arr, f_arr = np.asarray(base, dtype=bool), np.asarray(ft, dtype=bool)
    b = int(np.sum(b_arr & ~f_arr))
    c = int(np.sum(~b_arr & f_arr))
    p = 1.0 if b + c == 0 else float(stats.binomtest(c, b + c, 0.5).pvalue)
    return {"p_value": p, "base_only": b, "ft_only": c, "test": "mcnemar_exact"}


def paired_test(base: Sequence[float], ft: Sequence[float]) -> dict:
    """McNemar for 0/1 scores, Wilcoxon signed-rank for graded ones."""
    values = np.concatenate([np.asarray(base, dtype=float), np.asarray(ft, dtype=float)])
    if np.isin(values, (0.0, 1.0)).all():
        return mcnemar_exact(base, ft)
    diff = np.asarray(ft, dtype=float) - np.asarray(base, dtype=float)
    p = 1.0 if not diff.any() else float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
    return {"p_value": p, "test": "wilcoxon"}


def _z(alpha: float, power: float) -> tuple[float, float]:
    return float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(power))


def paired_mde(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a paired comparison of 0/1 scores: the smallest |p10 - p01| (share of
    items only one model gets right, one way minus the other) that a two-sided McNemar test at `alpha`
    finds with probability `power`, for n items of which a share `discordance` (p10 + p01) disagree.

    Connor (1987)'s normal approximation, n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2 with psi the
    discordance, solved for d: d = sqrt(psi) K with K = (z_a sqrt(n) + z_b sqrt(n - z_a^2 + z_b^2)) / (n + z_b^2).
    An effect d needs at least d discordant items (psi >= d), so a smaller observed discordance (0 when
    both models agree everywhere) is raised to d, which gives d = K^2; hence d = K max(sqrt(psi), K).
    Capped at 1 (no difference of proportions is detectable with so few items)."""
    z_a, z_b = _z(alpha, power)
    if n <= 0 or n - z_a ** 2 + z_b ** 2 <= 0:
        return 1.0
    k = (z_a * np.sqrt(n) + z_b * np.sqrt(n - z_a ** 2 + z_b ** 2)) / (n + z_b ** 2)
    return float(min(1.0, k * max(np.sqrt(discordance), k)))


def items_for_mde(mde: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items a paired comparison needs for its MDE to be at most `mde` (the inverse of paired_mde; Connor's
    sample size with the discordance raised to at least the effect)."""
    if not 0 < mde <= 1:
        raise ValueError(f"mde must be in (0, 1], got {mde}")
    z_a, z_b = _z(alpha, power)
    psi = max(discordance, mde)
    n = int(np.ceil((z_a * np.sqrt(psi) + z_b * np.sqrt(psi - mde ** 2)) ** 2 / mde ** 2))
    while paired_mde(n, discordance, alpha, power) > mde:  # rounding at the edge
        n += 1
    return n


def compare(base: Sequence[float], ft: Sequence[float], iters: int = 2000, level: float = 0.95,
            seed: int = 0) -> dict:
    """Everything a forgetting row needs: means, delta, bootstrap CI, paired test, and the MDE at 80% power
    and alpha = 1 - level given n and the observed discordance (items whose scores differ)."""
    if len(base) != len(ft):
        raise ValueError(f"paired comparison needs the same items: {len(base)} base vs {len(ft)} fine-tuned")
    low, high = paired_bootstrap_ci(base, ft, iters, level, seed)
    base_mean, ft_mean = float(np.mean(base)), float(np.mean(ft))
    discordance = float(np.mean(np.asarray(base, dtype=float) != np.asarray(ft, dtype=float))) if len(base) else 0.0
    return {"n": len(base), "base": base_mean, "ft": ft_mean, "delta": ft_mean - base_mean,
            "ci_low": low, "ci_high": high, "discordance": discordance,
            "mde": paired_mde(len(base), discordance, 1 - level), **paired_test(base, ft)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control), in input order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
