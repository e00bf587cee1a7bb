"""Tests of reports.stats: percentiles, CV, outliers, bootstrap CI, permutation test, Holm."""
from __future__ import annotations

import numpy as np
import pytest

from reports import stats


def test_percentiles_cv_outliers_ignore_nan() -> None:
    x = [1.0, 2.0, 3.0, 4.0, float("nan"), 5.0]
    assert stats.percentiles(x, (50,)) == {"p50": 3.0}
    assert stats.percentiles([], (50, 95)) == {"p50": None, "p95": None}
    assert stats.cv([2.0, 2.0, 2.0]) == 0.0
    assert stats.cv([1.0]) is None
    base = list(np.linspace(10, 11, 40))
    assert stats.outlier_count(base) == 0
    assert stats.outlier_count(base + [100.0, 120.0]) == 2
    assert stats.outlier_count(base + [-100.0], side="low") == 1
    d = stats.describe(base + [100.0])
    assert d.n == 41 and d.outliers == 1 and d.p50 == pytest.approx(np.median(base + [100.0]))


def test_bootstrap_ci_brackets_median_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    x = rng.lognormal(np.log(30), 0.2, 60)
    lo, hi = stats.bootstrap_median_ci(x, seed=1)
    assert lo < np.median(x) < hi
    assert stats.bootstrap_median_ci(x, seed=1) == (lo, hi)
    assert stats.bootstrap_median_ci([]) is None


def test_permutation_detects_30_percent_shift_on_40_samples() -> None:
    rng = np.random.default_rng(11)
    a = rng.lognormal(np.log(30.0), 0.2, 40)
    b = rng.lognormal(np.log(39.0), 0.2, 40)
    res = stats.permutation_test(a, b, n_perm=5000, seed=0)
    assert res.p_value < 0.01
    assert res.observed > 0
    one_sided = stats.permutation_test(a, b, n_perm=5000, seed=0, alternative="greater")
    assert one_sided.p_value < 0.01
    wrong_side = stats.permutation_test(a, b, n_perm=5000, seed=0, alternative="less")
    assert wrong_side.p_value > 0.5
    means = stats.permutation_test(a, b, statistic="mean", n_perm=5000, seed=0)
    assert means.p_value < 0.01


def test_permutation_p_value_has_plus_one_correction_and_is_seeded() -> None:
    a, b = np.arange(10.0), np.arange(10.0) + 100.0
    res = stats.permutation_test(a, b, n_perm=999, seed=5)
    assert res.p_value == pytest.approx(1 / 1000)  # never 0
    assert stats.permutation_test(a, b, n_perm=999, seed=5) == res
    same = stats.permutation_test(a, a, n_perm=999, seed=5)
    assert same.p_value == 1.0  # every permutation is at least as extreme as 0


def test_permutation_is_roughly_uniform_under_the_null() -> None:
    rng = np.random.default_rng(2024)
    ps = []
    for seed in range(60):
        a = rng.lognormal(np.log(30.0), 0.25, 40)
        b = rng.lognormal(np.log(30.0), 0.25, 40)
        ps.append(stats.permutation_test(a, b, n_perm=1000, seed=seed).p_value)
    ps_arr = np.asarray(ps)
    # alpha 0.05 over 60 null comparisons: expect 3; binomial P(>= 9) is about 1%.
    assert (ps_arr < 0.05).sum() <= 8
    assert (ps_arr < 0.01).sum() <= 4
    assert 0.35 < ps_arr.mean() < 0.65
    # Roughly uniform: every half of [0, 1] gets a fair share.
    assert 15 <= (ps_arr < 0.5).sum() <= 45


def test_permutation_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        stats.permutation_test([], [1.0, 2.0])
    with pytest.raises(ValueError):
        stats.permutation_test([1.0], [2.0], statistic="mode")  # type: ignore[arg-type]


def test_holm_adjustment() -> None:
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm([]) == []
    assert stats.holm([0.9, 0.9]) == pytest.approx([1.0, 1.0])


def test_relative_change() -> None:
    assert stats.relative_change(10.0, 13.0) == pytest.approx(0.3)
    assert stats.relative_change(0.0, 1.0) is None
    assert stats.relative_change(None, 1.0) is None
