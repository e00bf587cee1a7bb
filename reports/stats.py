"""Owns: the sample statistics reports and the gate rely on (percentiles, CV, outliers, bootstrap,
permutation tests, multiple-comparison correction).

Everything is vectorised numpy and seeded, so a report or a gate verdict is reproducible from
the same raw samples.  NaNs are dropped on input: a failed pod has no latency, and that is
counted elsewhere (errors), not imputed here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

Statistic = Literal["median", "mean"]
Alternative = Literal["two-sided", "greater", "less"]

# Permutations are evaluated in blocks so memory stays bounded for large samples.
_BLOCK_ELEMS = 4_000_000


def clean(values: Iterable[float] | np.ndarray) -> np.ndarray:
    """A float array without NaN/inf."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    return arr[np.isfinite(arr)]


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    arr = clean(values)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    got = np.percentile(arr, list(qs))
    return {f"p{q:g}": float(v) for q, v in zip(qs, got)}


def cv(values: Iterable[float]) -> float | None:
    """Coefficient of variation (sample std / mean); None below two samples or at mean 0."""
    arr = clean(values)
    if arr.size < 2:
        return None
    m = float(arr.mean())
    return None if m == 0.0 else float(arr.std(ddof=1) / abs(m))


def outlier_count(values: Iterable[float], k: float = 3.0, side: str = "high") -> int:
    """Samples beyond Q3 + k·IQR (side "high"), below Q1 - k·IQR ("low"), or either ("both")."""
    arr = clean(values)
    if arr.size < 4:
        return 0
    q1, q3 = np.percentile(arr, [25, 75])
    iqr = q3 - q1
    high = int((arr > q3 + k * iqr).sum())
    low = int((arr < q1 - k * iqr).sum())
    return {"high": high, "low": low, "both": high + low}[side]


def bootstrap_median_ci(
    values: Iterable[float], conf: float = 0.95, n_boot: int = 4000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the median; None for an empty sample."""
    arr = clean(values)
    if arr.size == 0:
        return None
    rng = np.random.default_rng(seed)
    meds = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMS // arr.size)
    for lo in range(0, n_boot, block):
        hi = min(n_boot, lo + block)
        idx = rng.integers(0, arr.size, size=(hi - lo, arr.size))
        meds[lo:hi] = np.median(arr[idx], axis=1)
    a = (1.0 - conf) / 2.0
    lo_v, hi_v = np.quantile(meds, [a, 1.0 - a])
    return float(lo_v), float(hi_v)


@dataclass
class PermutationResult:
    statistic: str
    observed: float  # stat(b) - stat(a)
    p_value: float
    n_a: int
    n_b: int
    n_perm: int
    alternative: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _stat(x: np.ndarray, statistic: Statistic) -> np.ndarray:
    return np.median(x, axis=-1) if statistic == "median" else x.mean(axis=-1)


def permutation_test(
    a: Iterable[float],
    b: Iterable[float],
    statistic: Statistic = "median",
    n_perm: int = 10_000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
) -> PermutationResult:
    """Two-sample permutation test of stat(b) - stat(a).

    "greater" tests whether b is larger than a (a slowdown when b is the candidate).  The p-value
    carries the +1 correction, (hits + 1) / (n_perm + 1), so it is never 0 and the test stays
    valid with a finite number of permutations.
    """
    xa, xb = clean(a), clean(b)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("permutation_test needs two non-empty samples")
    if statistic not in ("median", "mean"):
        raise ValueError(f"unknown statistic {statistic!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"unknown alternative {alternative!r}")
    pooled = np.concatenate([xa, xb])
    na = xa.size
    observed = float(_stat(xb, statistic) - _stat(xa, statistic))
    rng = np.random.default_rng(seed)
    # Ties at the observed value count as hits; a tiny tolerance keeps float noise from
    # turning an exact tie into a miss.
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    hits = 0
    block = max(1, _BLOCK_ELEMS // pooled.size)
    for lo in range(0, n_perm, block):
        m = min(n_perm, lo + block) - lo
        perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
        diff = _stat(perm[:, na:], statistic) - _stat(perm[:, :na], statistic)
        if alternative == "two-sided":
            hits += int((np.abs(diff) >= abs(observed) - tol).sum())
        elif alternative == "greater":
            hits += int((diff >= observed - tol).sum())
        else:
            hits += int((diff <= observed + tol).sum())
    p = (hits + 1) / (n_perm + 1)
    return PermutationResult(statistic, observed, float(p), int(na), int(xb.size), n_perm,
                             alternative)


def _strata(a: Iterable[float], b: Iterable[float], strata_a: Sequence[object],
            strata_b: Sequence[object]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(a, b) samples per stratum held by both sides, in a stable order."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if va.shape != (len(strata_a),) or vb.shape != (len(strata_b),):
        raise ValueError("every sample needs exactly one stratum")
    sa = np.array([str(x) for x in strata_a], dtype=object)
    sb = np.array([str(x) for x in strata_b], dtype=object)
    out = []
    for k in sorted(set(sa) & set(sb)):
        xa, xb = va[(sa == k) & np.isfinite(va)], vb[(sb == k) & np.isfinite(vb)]
        if xa.size and xb.size:
            out.append((xa, xb))
    if not out:
        raise ValueError("stratified test: no stratum holds samples of both sides")
    return out


def _weights(groups: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    # n_a·n_b/(n_a+n_b): a stratum's weight grows with how well it pins its own difference.
    w = np.array([xa.size * xb.size / (xa.size + xb.size) for xa, xb in groups])
    return w / w.sum()


def _weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise weighted median of x (m, K) with weights w (K,) summing to 1; the midpoint of
    the lower and upper weighted medians, so equal weights give the ordinary median."""
    order = np.argsort(x, axis=1)
    xs = np.take_along_axis(x, order, axis=1)
    cw = np.cumsum(w[order], axis=1)
    lo = np.argmax(cw >= 0.5 - 1e-9, axis=1)
    hi = np.argmax(cw > 0.5 + 1e-9, axis=1)
    rows = np.arange(x.shape[0])
    return (xs[rows, lo] + xs[rows, hi]) / 2.0


def _combine(diffs: np.ndarray, w: np.ndarray, statistic: Statistic) -> np.ndarray:
    """Per-stratum differences (m, K) -> one shift per row: a weighted median of them (robust:
    one stalled pod moves it little), or their weighted mean for the mean statistic."""
    return _weighted_median(diffs, w) if statistic == "median" else diffs @ w


def stratified_shift(a: Iterable[float], b: Iterable[float], strata_a: Sequence[object],
                     strata_b: Sequence[object], statistic: Statistic = "median") -> float:
    """How much b exceeds a, compared within strata only: the weighted median (or mean) over
    strata of stat(b_k) - stat(a_k).  A side with more pods in slow blocks does not look slower
    for it; with one pod per side per stratum it is the median of the paired differences."""
    groups = _strata(a, b, strata_a, strata_b)
    d = np.array([[float(_stat(xb, statistic)) - float(_stat(xa, statistic))
                   for xa, xb in groups]])
    return float(_combine(d, _weights(groups), statistic)[0])


def stratified_permutation_test(
    a: Iterable[float],
    b: Iterable[float],
    strata_a: Sequence[object],
    strata_b: Sequence[object],
    statistic: Statistic = "median",
    n_perm: int = 10_000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
) -> PermutationResult:
    """Permutation test of `stratified_shift` that swaps labels only within a stratum.

    A stratum is a group of samples taken under the same conditions (one interleaving block of
    one session: the same pod indices of both sides, seconds apart).  Under the null the
    labels are exchangeable within a stratum but not across strata, since the machine drifts
    between blocks; the statistic compares the sides within each stratum and the reference
    distribution keeps every stratum's composition, so drift between strata can pass for an
    effect neither in the observed value nor in the reference.  With one pod per side per
    stratum this is a paired sign-flip test.  Strata only one side holds are dropped.
    """
    if statistic not in ("median", "mean"):
        raise ValueError(f"unknown statistic {statistic!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"unknown alternative {alternative!r}")
    groups = _strata(a, b, strata_a, strata_b)
    w = _weights(groups)
    observed = stratified_shift(a, b, strata_a, strata_b, statistic)
    rng = np.random.default_rng(seed)
    scale = max(float(np.abs(np.concatenate([x for g in groups for x in g])).max()), 1.0)
    tol = 1e-9 * scale  # averaged floats: ties at the observed value must stay ties
    n_all = sum(xa.size + xb.size for xa, xb in groups)
    hits = 0
    block = max(1, _BLOCK_ELEMS // n_all)
    for lo in range(0, n_perm, block):
        m = min(n_perm, lo + block) - lo
        diffs = np.empty((m, len(groups)))
        for k, (xa, xb) in enumerate(groups):
            pooled = np.concatenate([xa, xb])
            perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
            diffs[:, k] = _stat(perm[:, xa.size:], statistic) - _stat(perm[:, :xa.size],
                                                                       statistic)
        diff = _combine(diffs, w, statistic)
        if alternative == "two-sided":
            hits += int((np.abs(diff) >= abs(observed) - tol).sum())
        elif alternative == "greater":
            hits += int((diff >= observed - tol).sum())
        else:
            hits += int((diff <= observed + tol).sum())
    p = (hits + 1) / (n_perm + 1)
    return PermutationResult(statistic, observed, float(p),
                             sum(xa.size for xa, _ in groups), sum(xb.size for _, xb in groups),
                             n_perm, alternative)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error control, any dependence)."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p)
    adj_sorted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj_sorted, 1.0)
    return [float(v) for v in out]


def relative_change(base: float | None, cand: float | None) -> float | None:
    """(cand - base) / base; None when undefined."""
    if base is None or cand is None or base == 0 or not np.isfinite(base) or not np.isfinite(cand):
        return None
    return float((cand - base) / abs(base))


@dataclass
class SampleStats:
    """What to print about a sample before drawing any conclusion from it (DESIGN §5)."""

    n: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    cv: float | None
    outliers: int  # beyond Q3 + 3·IQR

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe(values: Iterable[float], k: float = 3.0) -> SampleStats:
    arr = clean(values)
    pct = percentiles(arr, (50, 95, 99))
    return SampleStats(
        n=int(arr.size),
        mean=float(arr.mean()) if arr.size else None,
        p50=pct["p50"],
        p95=pct["p95"],
        p99=pct["p99"],
        cv=cv(arr),
        outliers=outlier_count(arr, k=k, side="high"),
    )
