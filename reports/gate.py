"""Owns: the performance regression gate (`chainbench gate`) and its reusable comparison.

A regression needs two things at once (DESIGN §5): a permutation test on the raw per-pod samples
says the candidate differs (p < alpha after Holm's correction across all tests of the gate, so
thirty metrics do not give thirty chances of a false alarm), and the median moved in the worse
direction by more than a noise floor (5% by default, per metric overridable) and by more than
an absolute floor (0.5 ms by default: a 3 µs step moving 40% is scheduler noise, not code; a
step whose medians both lie below it is not tested, so it costs the Holm family nothing).
When both sides come from the same A/B sessions (`chainbench ab`: pods carry their interleaving
`block`, runs their session `run_id`), the test is stratified: the statistic is the median
over blocks of the within-block difference (the candidate's median is reported as the
baseline's plus that shift), and labels are swapped only within one block of one session, so
machine drift between blocks or sessions cannot pass for a code effect.  Otherwise all samples
are pooled (exchangeable only if the runs saw the same machine state, which on a shared machine
separate runs do not: 3 of 8 same-code comparisons of separate runs failed).  Memory slopes
and error rates have no per-pod samples; they are gated on their floors alone.  Absolute
thresholds exist only as optional wide sanity bands.

`compare_runs(baseline_runs, candidate_runs, GateConfig(...)) -> GateResult` is the API an A/B
job across git revisions reuses; `main(argv)` is the command line.
Exit codes: 0 no regression, 1 regression, 2 bad input.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from reports import samples as smp
from reports import stats
from reports.schema import Run, load_runs
from reports.summary import memory_per_pod
from sim.vocabulary import MGMT_ROLES

Key = tuple[str, str, str]  # (chain, flavor, scenario)


class GateInputError(ValueError):
    """The baseline/candidate runs or the options cannot be compared."""


@dataclass
class ScalarSpec:
    """A metric with one value per run (no per-pod samples): gated on its floor only."""

    unit: str
    abs_floor: float  # changes smaller than this never count, whatever the ratio
    relative: bool = True  # False: the floor applies to the absolute difference


SCALARS: dict[str, ScalarSpec] = {
    "mgmt_pss_mb_per_pod": ScalarSpec("MB/pod", abs_floor=0.25),
    "mgmt_procs_per_pod": ScalarSpec("procs/pod", abs_floor=0.1),
    "error_rate": ScalarSpec("fraction", abs_floor=0.0, relative=False),
}


@dataclass
class GateConfig:
    noise_floor: float = 0.05
    metric_floors: dict[str, float] = field(default_factory=dict)  # fnmatch pattern -> floor
    alpha: float = 0.01
    correction: str = "holm"  # holm | none
    statistic: str = "median"  # median | mean (the permutation statistic)
    n_perm: int = 20_000
    seed: int = 0
    min_samples: int = 8
    metrics: list[str] = field(default_factory=list)  # fnmatch patterns; empty = all
    bands: dict[str, float] = field(default_factory=dict)  # metric pattern -> max cand p50
    error_rate_floor: float = 0.05  # absolute increase of the failed-pod fraction
    abs_floor_ms: float = 0.5  # sample metrics: smaller median changes (ms) never count
    stratify: bool = True  # stratified test when both sides carry blocks of the same sessions

    def floor_for(self, metric: str) -> float:
        if metric == "error_rate":
            return self.error_rate_floor
        hit = [f for pat, f in self.metric_floors.items() if fnmatch.fnmatchcase(metric, pat)]
        return hit[-1] if hit else self.noise_floor

    def wants(self, metric: str) -> bool:
        return not self.metrics or any(fnmatch.fnmatchcase(metric, p) for p in self.metrics)


@dataclass
class MetricComparison:
    chain: str
    flavor: str
    scenario: str
    metric: str
    unit: str
    n_base: int
    n_cand: int
    base: float | None  # median (ms for sample metrics) or the scalar value
    cand: float | None
    change: float | None  # relative change (absolute for error_rate)
    floor: float
    p_value: float | None = None
    p_adjusted: float | None = None
    status: str = "ok"  # ok | regression | improvement | insufficient | missing
    note: str = ""
    test: str = ""  # strata (within session blocks) | pooled | "" (not tested)

    @property
    def key(self) -> Key:
        return (self.chain, self.flavor, self.scenario)


@dataclass
class GateResult:
    comparisons: list[MetricComparison]
    config: GateConfig
    n_perm: int = 0  # permutations actually used (raised for many tests, see compare_runs)
    unmatched_baseline: list[Key] = field(default_factory=list)
    unmatched_candidate: list[Key] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricComparison]:
        return [c for c in self.comparisons if c.status == "regression"]

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "regressions": len(self.regressions),
            "config": asdict(self.config),
            "n_perm": self.n_perm,
            "unmatched_baseline": [list(k) for k in self.unmatched_baseline],
            "unmatched_candidate": [list(k) for k in self.unmatched_candidate],
            "comparisons": [asdict(c) for c in self.comparisons],
        }

    def to_markdown(self) -> str:
        cfg = self.config
        verdict = "PASS" if self.passed else "FAIL"
        n_reg = len(self.regressions)
        lines = [
            f"## Gate: {verdict} — {n_reg} regression(s) in {len(self.comparisons)} comparisons",
            "",
            f"alpha {cfg.alpha:g} ({cfg.correction} across the gate's tests), permutation test "
            f"of the {cfg.statistic} ({self.n_perm} permutations, seed {cfg.seed}), noise floor "
            f"{cfg.noise_floor:.0%}" + (f", metric floors {cfg.metric_floors}"
                                        if cfg.metric_floors else "")
            + f", absolute floor {cfg.abs_floor_ms:g} ms; samples "
            + _tests_used(self.comparisons) + ".",
            "",
        ]
        # The verdict's reasons first: a CI log reader should not have to scan the table.
        for c in self.regressions:
            lines.append(f"- REGRESSION {c.chain}/{c.flavor} {c.scenario} {c.metric}: "
                         f"{_num(c.base)} -> {_num(c.cand)} {c.unit} ({_chg(c)}"
                         + (f", p adj {_p(c.p_adjusted)}" if c.p_adjusted is not None else "")
                         + (f", {c.note}" if c.note else "") + ")")
        if self.regressions:
            lines.append("")
        lines += [
            "| chain | flavor | scenario | metric | n base/cand | base | cand | change | floor "
            "| p | p adj | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.comparisons:
            mark = {"regression": "**REGRESSION**", "improvement": "improvement"}.get(
                c.status, c.status)
            if c.note:
                mark += f" ({c.note})"
            lines.append(
                f"| {c.chain} | {c.flavor} | {c.scenario} | {c.metric} | {c.n_base}/{c.n_cand} "
                f"| {_num(c.base)} {c.unit} | {_num(c.cand)} {c.unit} | {_chg(c)} "
                f"| {_floor(c)} | {_p(c.p_value)} | {_p(c.p_adjusted)} | {mark} |")
        for side, keys in (("baseline", self.unmatched_baseline),
                           ("candidate", self.unmatched_candidate)):
            for k in keys:
                lines.append(f"\nUnmatched {side} run: chain={k[0]} flavor={k[1]} "
                             f"scenario={k[2]} (not compared)")
        return "\n".join(lines) + "\n"


def _tests_used(comps: list[MetricComparison]) -> str:
    kinds = {c.test for c in comps if c.test}
    if kinds == {"strata"}:
        return ("permuted within interleaving blocks of the same sessions (stratified; cand = "
                "base + the median shift within blocks)")
    if kinds == {"pooled"}:
        return "pooled across runs (no shared session blocks)"
    return "stratified where both sides share session blocks, else pooled" if kinds else \
        "not tested"


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _p(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}")


def _chg(c: MetricComparison) -> str:
    if c.change is None:
        return "-"
    if c.metric == "error_rate":
        return f"{c.change * 100:+.1f} pt"
    return f"{c.change:+.1%}"


def _floor(c: MetricComparison) -> str:
    return f"{c.floor * 100:.1f} pt" if c.metric == "error_rate" else f"{c.floor:.0%}"


def _group(runs: Sequence[Run], side: str) -> dict[Key, list[Run]]:
    out: dict[Key, list[Run]] = {}
    for r in runs:
        out.setdefault((r.meta.chain, r.meta.flavor, r.meta.scenario), []).append(r)
    for k, rs in out.items():
        sources = {r.meta.source for r in rs}
        if len(sources) > 1:
            raise GateInputError(
                f"{side} runs for chain={k[0]} flavor={k[1]} scenario={k[2]} mix sources "
                f"{sorted(sources)}: compare bench with bench and sim with sim")
    return out


def _scalar(runs: list[Run], metric: str) -> float | None:
    vals: list[float] = []
    for r in runs:
        if metric == "error_rate":
            measured = r.pods[~r.pods["warmup"]]
            if len(measured):
                vals.append(float((measured["outcome"] != "ok").mean()))
            continue
        mem = memory_per_pod(r.memory, MGMT_ROLES)
        v = mem["pss_mb" if metric == "mgmt_pss_mb_per_pod" else "procs"]
        if v is not None:
            vals.append(float(v))
    return float(np.mean(vals)) if vals else None


def _seed(base: int, key: Key, metric: str) -> int:
    # Stable across processes (unlike hash()), so a verdict is reproducible.
    return (base + zlib.crc32(f"{key}|{metric}".encode())) % (2**32)


def compare_runs(
    baseline_runs: Sequence[Run], candidate_runs: Sequence[Run], config: GateConfig | None = None
) -> GateResult:
    """Compare runs matched by (chain, flavor, scenario); raise GateInputError when nothing
    matches or the inputs are inconsistent."""
    cfg = config or GateConfig()
    if not 0 < cfg.alpha < 1:
        raise GateInputError(f"alpha must be in (0, 1), got {cfg.alpha}")
    if cfg.correction not in ("holm", "none"):
        raise GateInputError(f"unknown correction {cfg.correction!r} (holm|none)")
    if cfg.statistic not in ("median", "mean"):
        raise GateInputError(f"unknown statistic {cfg.statistic!r} (median|mean)")
    if not baseline_runs or not candidate_runs:
        raise GateInputError("need at least one baseline and one candidate run")
    base = _group(baseline_runs, "baseline")
    cand = _group(candidate_runs, "candidate")
    keys = [k for k in base if k in cand]
    if not keys:
        raise GateInputError(
            f"no candidate run matches a baseline run by (chain, flavor, scenario): "
            f"baseline {sorted(base)}, candidate {sorted(cand)}")

    comps: list[MetricComparison] = []
    # comparisons awaiting a test: (index, baseline, candidate, their strata or None)
    pending: list[tuple[int, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]] = []
    for key in sorted(keys):
        b_runs, c_runs = base[key], cand[key]
        strata = cfg.stratify and smp.same_sessions(b_runs, c_runs)
        b_metrics = {m for r in b_runs for m in smp.metric_names(r)}
        c_metrics = {m for r in c_runs for m in smp.metric_names(r)}
        ordered = [m for m in smp.POD_METRICS if m in b_metrics | c_metrics]
        ordered += sorted(m for m in b_metrics | c_metrics if m not in smp.POD_METRICS)
        for metric in ordered:
            if not cfg.wants(metric):
                continue
            comp, xb, xc, st = _compare_samples(key, metric, b_runs, c_runs, cfg, strata)
            comps.append(comp)
            if comp.status == "ok" and comp.test:
                pending.append((len(comps) - 1, xb, xc, st))
        for metric, spec in SCALARS.items():
            if cfg.wants(metric):
                comps.append(_compare_scalar(key, metric, spec, b_runs, c_runs, cfg))

    # The smallest p-value a permutation test can give is 1/(n+1); after Holm it is multiplied
    # by the number of tests, so too few permutations would make a regression undetectable.
    n_perm = cfg.n_perm
    if cfg.correction == "holm" and pending:
        n_perm = max(n_perm, math.ceil(3 * len(pending) / cfg.alpha))
    for i, xb, xc, st in pending:
        c = comps[i]
        seed = _seed(cfg.seed, c.key, c.metric)
        if st is not None:
            res = stats.stratified_permutation_test(
                xb, xc, st[0], st[1], statistic=cfg.statistic,  # type: ignore[arg-type]
                n_perm=n_perm, seed=seed)
        else:
            res = stats.permutation_test(xb, xc, statistic=cfg.statistic,  # type: ignore[arg-type]
                                         n_perm=n_perm, seed=seed)
        c.p_value = res.p_value
    tested = [i for i, _, _, _ in pending]
    raw = [comps[i].p_value for i in tested]
    adj = stats.holm(raw) if cfg.correction == "holm" else list(raw)  # type: ignore[arg-type]
    for i, p in zip(tested, adj):
        c = comps[i]
        c.p_adjusted = p
        significant = p < cfg.alpha
        big = c.base is not None and c.cand is not None and \
            abs(c.cand - c.base) > cfg.abs_floor_ms
        if significant and big and c.change is not None and c.change > c.floor:
            c.status = "regression"
        elif significant and big and c.change is not None and c.change < -c.floor:
            c.status = "improvement"
        elif significant:
            c.note = "significant, within floor"
    for c in comps:
        _apply_band(c, cfg)
    return GateResult(
        comparisons=comps,
        config=cfg,
        n_perm=n_perm,
        unmatched_baseline=sorted(k for k in base if k not in cand),
        unmatched_candidate=sorted(k for k in cand if k not in base),
    )


def _compare_samples(
    key: Key, metric: str, b_runs: list[Run], c_runs: list[Run], cfg: GateConfig, strata: bool
) -> tuple[MetricComparison, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The comparison without its p-value (tests run later, once their number is known)."""
    (xb, sb), (xc, sc) = (smp.pooled(b_runs, metric, strata),
                          smp.pooled(c_runs, metric, strata))
    xb, xc = xb * 1e3, xc * 1e3
    st = (sb, sc) if sb is not None and sc is not None else None
    mb = float(np.median(xb)) if xb.size else None
    mc = float(np.median(xc)) if xc.size else None
    c = MetricComparison(*key, metric=metric, unit="ms", n_base=int(xb.size),
                         n_cand=int(xc.size), base=mb, cand=mc,
                         change=stats.relative_change(mb, mc), floor=cfg.floor_for(metric))
    if xb.size == 0 or xc.size == 0:
        c.status = "missing"
        c.note = "no samples in " + ("baseline" if xb.size == 0 else "candidate")
        return c, xb, xc, st
    if min(xb.size, xc.size) < cfg.min_samples:
        c.status = "insufficient"
        c.note = f"fewer than {cfg.min_samples} samples"
        return c, xb, xc, st
    if st is not None and not (set(st[0]) & set(st[1])):
        st = None  # no block holds both sides (e.g. all failed): nothing to stratify on
    if st is not None and c.base is not None:
        # The candidate's level is the baseline's plus the shift seen within blocks: a side
        # whose pods happen to sit in slower blocks (a failed pod, a block cut short) must not
        # look slower for it, and one stalled pod must not move the change past the floor.
        c.cand = c.base + stats.stratified_shift(xb, xc, st[0], st[1],
                                                 cfg.statistic)  # type: ignore[arg-type]
        c.change = stats.relative_change(c.base, c.cand)
    assert c.base is not None and c.cand is not None
    if max(c.base, c.cand) < cfg.abs_floor_ms:
        # Both medians below the absolute floor: their difference cannot exceed it, so the
        # metric can never be a regression; testing it would only widen the Holm family.
        c.note = f"below {cfg.abs_floor_ms:g} ms floor, not tested"
        return c, xb, xc, st
    c.test = "strata" if st is not None else "pooled"
    return c, xb, xc, st


def _compare_scalar(key: Key, metric: str, spec: ScalarSpec, b_runs: list[Run],
                    c_runs: list[Run], cfg: GateConfig) -> MetricComparison:
    vb, vc = _scalar(b_runs, metric), _scalar(c_runs, metric)
    floor = cfg.floor_for(metric)
    if spec.relative:
        change = stats.relative_change(vb, vc)
    else:
        change = None if vb is None or vc is None else vc - vb
    c = MetricComparison(*key, metric=metric, unit=spec.unit, n_base=len(b_runs),
                         n_cand=len(c_runs), base=vb, cand=vc, change=change, floor=floor)
    if vb is None or vc is None:
        c.status = "missing"
        c.note = "not measured"
        return c
    big_enough = abs(vc - vb) > spec.abs_floor
    if spec.relative and change is None:
        # A zero baseline (e.g. 0 processes per pod): judge the absolute difference only.
        if big_enough and vc > vb:
            c.status, c.note = "regression", "baseline 0"
        return c
    assert change is not None
    if change > floor and (big_enough or not spec.relative):
        c.status = "regression"
    elif change < -floor and (big_enough or not spec.relative):
        c.status = "improvement"
    c.note = c.note or "floor only"
    return c


def _apply_band(c: MetricComparison, cfg: GateConfig) -> None:
    limits = [v for pat, v in cfg.bands.items() if fnmatch.fnmatchcase(c.metric, pat)]
    if limits and c.cand is not None and c.cand > limits[-1]:
        c.status = "regression"
        c.note = f"outside sanity band {limits[-1]:g} {c.unit}"


def _parse_pairs(items: list[str] | None, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, val = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            v = float(val)
        except ValueError:
            raise GateInputError(f"{what} expects METRIC=NUMBER, got {item!r}") from None
        if not math.isfinite(v) or v < 0:
            raise GateInputError(f"{what} {item!r}: the number must be finite and >= 0")
        out[name] = v
    return out


def _check_patterns(runs: Sequence[Run], cfg: GateConfig) -> None:
    """A floor, band or metric filter that matches nothing is a typo, not a silent pass."""
    names = {m for r in runs for m in smp.metric_names(r)} | set(SCALARS)
    for what, pats in (("--metric-floor", cfg.metric_floors), ("--band", cfg.bands),
                       ("--metrics", cfg.metrics)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise GateInputError(f"{what} {pat!r} matches no metric; metrics: "
                                     f"{sorted(names)}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="chainbench gate",
        description="Compare candidate runs with baseline runs; exit 1 on a regression "
                    "(permutation test p < alpha AND median worse by more than the floor).")
    ap.add_argument("--baseline", required=True, nargs="+", help="baseline run dir(s)")
    ap.add_argument("--candidate", required=True, nargs="+", help="candidate run dir(s)")
    ap.add_argument("--noise-floor", type=float, default=0.05,
                    help="minimum relative change of the median that counts (default 0.05)")
    ap.add_argument("--metric-floor", action="append", metavar="METRIC=FLOOR",
                    help="per-metric floor, METRIC may be a glob (e.g. 'step:*=0.2'); repeatable")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level (0.01)")
    ap.add_argument("--correction", choices=("holm", "none"), default="holm",
                    help="multiple-comparison correction across the gate's tests (holm)")
    ap.add_argument("--statistic", choices=("median", "mean"), default="median")
    ap.add_argument("--permutations", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-samples", type=int, default=8)
    ap.add_argument("--metrics", action="append", metavar="GLOB",
                    help="only these metrics (globs, repeatable); default all")
    ap.add_argument("--band", action="append", metavar="METRIC=MAX",
                    help="sanity band: fail when the candidate median exceeds MAX (ms, or the "
                         "metric's unit); repeatable")
    ap.add_argument("--error-rate-floor", type=float, default=0.05,
                    help="allowed absolute increase of the failed-pod fraction (0.05)")
    ap.add_argument("--abs-floor-ms", type=float, default=0.5,
                    help="minimum absolute change of a sample metric's median in ms; metrics "
                         "whose medians both lie below it are not tested (default 0.5)")
    ap.add_argument("--no-strata", action="store_true",
                    help="pool all samples even when both sides share session blocks")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    return ap


def main(argv: list[str]) -> int:
    ap = build_parser()
    try:
        ns = ap.parse_args(argv)
    except SystemExit as exc:  # argparse already printed why
        return 0 if exc.code in (0, None) else 2
    try:
        if ns.noise_floor < 0 or not math.isfinite(ns.noise_floor):
            raise GateInputError("--noise-floor must be a finite number >= 0")
        if ns.abs_floor_ms < 0 or not math.isfinite(ns.abs_floor_ms):
            raise GateInputError("--abs-floor-ms must be a finite number >= 0")
        if ns.permutations < 100:
            raise GateInputError("--permutations must be at least 100")
        cfg = GateConfig(
            noise_floor=ns.noise_floor,
            metric_floors=_parse_pairs(ns.metric_floor, "--metric-floor"),
            alpha=ns.alpha,
            correction=ns.correction,
            statistic=ns.statistic,
            n_perm=ns.permutations,
            seed=ns.seed,
            min_samples=max(2, ns.min_samples),
            metrics=list(ns.metrics or []),
            bands=_parse_pairs(ns.band, "--band"),
            error_rate_floor=ns.error_rate_floor,
            abs_floor_ms=ns.abs_floor_ms,
            stratify=not ns.no_strata,
        )
        baseline, candidate = load_runs(ns.baseline), load_runs(ns.candidate)
        _check_patterns([*baseline, *candidate], cfg)
        result = compare_runs(baseline, candidate, cfg)
        if not result.comparisons:
            raise GateInputError("no metric left to compare (check --metrics)")
    except (ValueError, OSError) as exc:  # GateInputError, SchemaError, unreadable Parquet
        print(f"chainbench gate: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.to_markdown())
    return result.exit_code
