"""The paired statistics on constructed per-item results with known answers."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from sftflow import stats


def test_known_delta_and_discordant_counts():
    base = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    ft = [1, 0, 0, 1, 0, 1, 0, 0, 0, 0]  # 3 items lost (1,2,8), 1 gained (5)
    out = stats.compare(base, ft, iters=500)
    assert out["n"] == 10 and out["base"] == 0.5 and out["ft"] == 0.3
    assert out["delta"] == pytest.approx(-0.2)
    assert (out["base_only"], out["ft_only"]) == (3, 1)
    assert out["p_value"] == pytest.approx(0.625)  # exact binomial: 2 * P(X <= 1 | n=4, 1/2) = 2 * 5/16
    assert out["ci_low"] <= -0.2 <= out["ci_high"]


def test_identical_models_have_a_zero_width_ci_and_p_one():
    scores = [1, 0, 1, 1, 0] * 20
    out = stats.compare(scores, scores)
    assert out["delta"] == out["ci_low"] == out["ci_high"] == 0.0 and out["p_value"] == 1.0


def test_a_large_consistent_drop_is_significant():
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.6).astype(float)
    ft = base.copy()
    ft[np.flatnonzero(base)[:60]] = 0.0  # 60 correct answers lost, none gained: delta = -0.15
    out = stats.compare(base, ft)
    assert out["delta"] == pytest.approx(-0.15)
    assert out["p_value"] < 1e-10 and out["ci_high"] < 0


def test_a_small_balanced_change_is_not_significant():
    base = np.array([1.0] * 50 + [0.0] * 50)
    ft = base.copy()
    ft[:6] = 0.0   # 6 lost
    ft[50:54] = 1.0  # 4 gained: delta = -0.02 on 100 items
    out = stats.compare(base, ft)
    assert out["delta"] == pytest.approx(-0.02)
    assert out["p_value"] > 0.5 and out["ci_low"] < 0 < out["ci_high"]


def test_bootstrap_ci_covers_the_true_delta_about_95_percent_of_the_time():
    """Simulate paired 0/1 outcomes with a known population delta of -0.05; count how often the CI covers it."""
    rng = np.random.default_rng(7)
    n, reps, covered = 300, 300, 0
    for rep in range(reps):
        base = rng.random(n) < 0.6
        # ft loses 15% of the items base gets right and wins 10% of the rest: delta = -0.6*0.15 + 0.4*0.1 = -0.05
        ft = np.where(base, rng.random(n) >= 0.15, rng.random(n) < 0.1)
        low, high = stats.paired_bootstrap_ci(base, ft, iters=1000, seed=rep)
        covered += low <= -0.05 <= high
    assert 0.91 <= covered / reps <= 0.98, covered / reps


def test_graded_scores_use_wilcoxon():
    base = [0.2, 0.4, 0.6, 0.8, 0.5, 0.3, 0.7, 0.9]
    ft = [b - 0.1 - 0.01 * i for i, b in enumerate(base)]
    out = stats.compare(base, ft)
    assert out["test"] == "wilcoxon"
    assert out["p_value"] == pytest.approx(scipy_stats.wilcoxon(np.subtract(ft, base)).pvalue)


def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same items"):
        stats.compare([1, 0], [1])


def test_mde_solves_connors_sample_size_formula():
    from scipy.stats import norm

    z_a, z_b = norm.ppf(0.975), norm.ppf(0.8)
    for n, psi in [(100, 0.2), (285, 0.1), (1000, 0.05)]:
        d = stats.paired_mde(n, psi)
        # Connor (1987): the n that detects d at 80% power with discordance psi is the n we started from
        assert (z_a * psi ** 0.5 + z_b * (psi - d ** 2) ** 0.5) ** 2 / d ** 2 == pytest.approx(n, rel=1e-9)
    assert stats.paired_mde(100, 0.2) == pytest.approx(0.12382, abs=1e-5)  # worked by hand
    assert stats.paired_mde(400, 0.1) < stats.paired_mde(100, 0.1) < stats.paired_mde(100, 0.3)
    # No observed discordance: an effect d still needs d discordant items, so the MDE stays finite.
    assert stats.paired_mde(100, 0.0) == pytest.approx(stats.paired_mde(100, stats.paired_mde(100, 0.0)))
    assert stats.paired_mde(3, 0.5) == 1.0  # too few items for any effect


def test_a_difference_of_the_mde_is_found_about_80_percent_of_the_time():
    """Simulated McNemar tests (normal approximation, as the formula) at n=400, discordance 0.15."""
    n, psi = 400, 0.15
    d = stats.paired_mde(n, psi)
    rng = np.random.default_rng(0)
    cells = rng.multinomial(n, [(psi + d) / 2, (psi - d) / 2, 1 - psi], size=4000)
    b, c = cells[:, 0], cells[:, 1]
    z = np.abs(b - c) / np.sqrt(np.maximum(b + c, 1))
    assert np.mean(z > 1.959964) == pytest.approx(0.8, abs=0.03)


def test_items_for_mde_is_the_inverse_of_the_mde():
    n = stats.items_for_mde(0.03, 0.1)
    assert stats.paired_mde(n, 0.1) <= 0.03 < stats.paired_mde(n - 1, 0.1)
    assert stats.items_for_mde(0.5, 0.0) < stats.items_for_mde(0.1, 0.0)


def test_compare_reports_the_mde_from_the_observed_discordance():
    base = [1, 0] * 50
    ft = [1, 1] * 25 + [0, 0] * 25  # 50 of 100 items differ
    out = stats.compare(base, ft, iters=200)
    assert out["discordance"] == 0.5 and out["mde"] == pytest.approx(stats.paired_mde(100, 0.5))
