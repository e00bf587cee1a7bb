"""Owns: model validation — calibrate on some bench runs, predict held-out ones, score the error.

`chainbench validate --calibrate-on SEQ_DIR... --validate-on C10_DIR...` fits a calibration from
the first set (sequential runs: no queueing in the spans), simulates every held-out bench run
with the same pods, concurrency and containers (averaging several seeds so the model's own
sampling noise does not count as error) and prints, per chain, the relative error of the
RunPodSandbox p50 and p95 and of throughput.  Exit 1 when any error exceeds the threshold
(default 10%), 2 on bad input.

Several sessions of the same held-out scenario are pooled (pass them all; `--per-run` scores
each alone): on a shared 2-core machine one concurrency-10 session's p95 moves by tens of percent
from one session to the next, more than any threshold worth having.  Pooled, the measured
latency percentiles come from every session's pods together and throughput is the sessions'
mean; the `spread` column shows how far the single sessions lay apart ((max - min) / pooled),
and the `95% interval` column where the measured figure could lie (a bootstrap over the
sessions): the measurement's own noise against which the model's error can be read.  An error
above the threshold whose prediction lies inside that interval still fails (exit 1) but says
so: five sessions cannot tell such a model from the truth.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from reports import samples
from reports.schema import Run, RunMeta, SchemaError, conform, load_runs
from reports.summary import _pct, summarize
from scenarios.loader import Scenario
from sim.calibration import MODELLED_CHAINS, Calibration, CalibrationError, calibrate
from sim.cli_simulate import INPUT_ERRORS
from sim.cluster import simulate_chain
from sim.scenario_model import SimSettings

METRICS = ("run_pod_p50_ms", "run_pod_p95_ms", "pods_per_s")


@dataclass
class Score:
    chain: str
    flavor: str
    run: str
    metric: str
    measured: float | None
    predicted: float | None
    sessions: int = 1
    spread: float | None = None  # (max - min) / measured over the single sessions, if pooled
    # 95% bootstrap interval of the measured figure (sessions resampled; one session: its
    # pods): how far the measurement itself could lie from the truth.
    ci: tuple[float, float] | None = None

    @property
    def within_ci(self) -> bool | None:
        """The prediction lies inside the measurement's own 95% interval."""
        if self.ci is None or self.predicted is None:
            return None
        return self.ci[0] <= self.predicted <= self.ci[1]

    @property
    def error(self) -> float | None:
        b = self.bias
        return None if b is None else abs(b)

    @property
    def bias(self) -> float | None:
        """Signed relative error: > 0 when the model predicts more than was measured."""
        if self.measured in (None, 0) or self.predicted is None:
            return None
        return (self.predicted - self.measured) / abs(self.measured)

    def to_json(self) -> dict[str, Any]:
        return {"chain": self.chain, "flavor": self.flavor, "run": self.run,
                "metric": self.metric, "measured": self.measured,
                "predicted": self.predicted, "error": self.error, "bias": self.bias,
                "sessions": self.sessions, "spread": self.spread,
                "ci": None if self.ci is None else list(self.ci), "within_ci": self.within_ci}


def _figures(summary: dict[str, Any]) -> dict[str, float | None]:
    rp = summary["run_pod_sandbox_ms"]
    return {"run_pod_p50_ms": rp["p50"], "run_pod_p95_ms": rp["p95"],
            "pods_per_s": summary["pods_per_s"]}


def _latencies_ms(run: Run) -> np.ndarray:
    return samples.sample(run, "run_pod_sandbox") * 1e3


def _pooled(lat: list[np.ndarray], rates: list[float | None]) -> dict[str, float | None]:
    """Measured figures of several sessions of one scenario and chain, pooled: percentiles
    of every session's RunPodSandbox latencies (ms) together, the sessions' mean rate."""
    pct = _pct(np.concatenate(lat) if lat else np.array([]), (50, 95))
    known = [float(r) for r in rates if r is not None]
    return {"run_pod_p50_ms": pct["p50"], "run_pod_p95_ms": pct["p95"],
            "pods_per_s": round(float(np.mean(known)), 3) if known else None}


BOOTSTRAP = 2000  # resamples for the measured figures' intervals


def _intervals(lat: list[np.ndarray], rates: list[float | None],
               seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """95% bootstrap intervals of the measured figures, from each session's latencies (ms)
    and rate.  Several sessions: the sessions are resampled (a session's pods are not
    independent draws: the machine drifts between sessions, which is most of the noise); one
    session: its pods (no throughput interval)."""
    rate_v = np.array([np.nan if r is None else float(r) for r in rates])
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[float, float] | None] = {m: None for m in METRICS}
    if len(lat) > 1:
        draws = rng.integers(0, len(lat), size=(BOOTSTRAP, len(lat)))
        p = np.array([np.percentile(np.concatenate([lat[i] for i in d]), (50, 95))
                      if sum(lat[i].size for i in d) else (np.nan, np.nan) for d in draws])
        r = rate_v[draws].mean(axis=1)
        cols = {"run_pod_p50_ms": p[:, 0], "run_pod_p95_ms": p[:, 1], "pods_per_s": r}
    elif lat and lat[0].size > 1:
        x = lat[0]
        p = np.percentile(x[rng.integers(0, x.size, size=(BOOTSTRAP, x.size))], (50, 95),
                          axis=1)
        cols = {"run_pod_p50_ms": p[0], "run_pod_p95_ms": p[1]}
    else:
        return out
    for m, v in cols.items():
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.percentile(v, (2.5, 97.5))
            out[m] = (round(float(lo), 3), round(float(hi), 3))
    return out


def _spread(values: list[float | None], pooled: float | None) -> float | None:
    vals = [v for v in values if v is not None]
    if len(vals) < 2 or not pooled:
        return None
    return (max(vals) - min(vals)) / abs(pooled)


def scenario_of(meta: RunMeta, pods: int) -> tuple[Scenario, int | None]:
    """The scenario a bench run executed, as far as the model needs it, and its block size
    (bench's load driver records both in run.json extra)."""
    points = tuple(int(p) for p in meta.extra.get("memory_points", []) if 0 <= int(p) <= pods)
    block = meta.extra.get("block")
    sc = Scenario(name=meta.scenario, flavor=meta.flavor, chains=(meta.chain,), pods=pods,
                  concurrency=max(int(meta.concurrency), 1),
                  containers_per_pod=int(meta.containers_per_pod),
                  warmup_pods=int(meta.warmup_pods), memory_at=points,
                  boot=str(meta.extra.get("boot", "restore")),
                  schema=str(meta.extra.get("schema", "current")))
    return sc, (int(block) if isinstance(block, int) else None)


def predict(run: Run, cal: Calibration, replications: int = 20, seed: int = 1,
            keep: list[pd.DataFrame] | None = None,
            core_limit: int = 0) -> dict[str, float | None]:
    """Mean predicted figures for a bench run over `replications` seeds; with `keep`, every
    seed's simulated pods are appended to it (for the figure)."""
    scenario, block = scenario_of(run.meta, max(len(run.pods), 1))
    acc: dict[str, list[float]] = {m: [] for m in METRICS}
    for r in range(replications):
        settings = SimSettings(seed=seed + r, aggregate="rows", stop=True, block=block,
                               core_limit=core_limit)
        res = simulate_chain(scenario, settings, cal, run.meta.chain)
        sim_run = Run(path=run.path, meta=RunMeta(scenario=scenario.name, source="sim",
                                                  chain=run.meta.chain, flavor=scenario.flavor,
                                                  concurrency=scenario.concurrency),
                      pods=conform("pods", res.pods), spans=conform("spans", res.spans),
                      memory=conform("memory", res.memory), cpu=conform("cpu", None))
        for k, v in _figures(summarize(sim_run)).items():
            if v is not None:
                acc[k].append(float(v))
        if keep is not None:
            keep.append(sim_run.pods.assign(pod=f"seed{seed + r}/" + sim_run.pods["pod"]))
    return {k: (round(float(np.mean(v)), 3) if v else None) for k, v in acc.items()}


def validate(calibrate_on: list[str], validate_on: list[str], replications: int = 20,
             seed: int = 1, pool: bool = True, curves: list[Run] | None = None,
             core_limit: int = 0) -> tuple[Calibration, list[Score]]:
    """Scores of every held-out group; with `curves`, the pooled measured and predicted pods
    of each group are appended to it as runs (source bench / sim) for `figure`.  core_limit:
    the what-if of `[sim] core_limit` (limited processor sharing) for every prediction."""
    cal = calibrate(calibrate_on)
    try:
        runs = load_runs(validate_on)
    except SchemaError as exc:
        raise CalibrationError(str(exc)) from exc
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        if run.meta.source != "bench" or run.meta.chain not in MODELLED_CHAINS:
            continue
        if f"{run.meta.chain}/{run.meta.flavor}" not in cal.chains:
            continue
        m = run.meta
        key = (m.chain, m.flavor, m.scenario, m.scenario_digest, m.concurrency,
               len(run.pods)) if pool else (str(run.path),)
        groups.setdefault(key, []).append(run)
    scores: list[Score] = []
    for group in groups.values():
        run = group[0]
        singles = [_figures(summarize(r)) for r in group]
        lat = [_latencies_ms(r) for r in group]
        rates = [f["pods_per_s"] for f in singles]
        measured = singles[0] if len(group) == 1 else _pooled(lat, rates)
        ci = _intervals(lat, rates, seed)
        print(f"validate: predicting {run.meta.chain}/{run.meta.flavor} {run.meta.scenario} "
              f"({len(run.pods)} pods, concurrency {run.meta.concurrency}"
              f"{f', {len(group)} sessions pooled' if len(group) > 1 else ''}) over "
              f"{replications} seeds", file=sys.stderr, flush=True)
        kept: list[pd.DataFrame] | None = [] if curves is not None else None
        predicted = predict(run, cal, replications, seed, kept, core_limit)
        if curves is not None and kept:
            curves.append(_pooled_run(group, "bench", pd.concat(
                [r.pods.assign(pod=f"s{i}/" + r.pods["pod"]) for i, r in enumerate(group)],
                ignore_index=True)))
            curves.append(_pooled_run(group, "sim", pd.concat(kept, ignore_index=True)))
        where = str(run.path) if len(group) == 1 else f"{len(group)} sessions: " + ", ".join(
            str(r.path) for r in group)
        for m in METRICS:
            scores.append(Score(run.meta.chain, run.meta.flavor, where, m, measured[m],
                                predicted[m], sessions=len(group),
                                spread=_spread([f[m] for f in singles], measured[m]),
                                ci=ci[m]))
    if not scores:
        raise CalibrationError(f"no bench runs of chains {list(MODELLED_CHAINS)} to validate "
                               f"under {validate_on}")
    return cal, scores


def _pooled_run(group: list[Run], source: str, pods: pd.DataFrame) -> Run:
    m = group[0].meta
    meta = RunMeta(scenario=m.scenario, source=source, chain=m.chain, flavor=m.flavor,
                   concurrency=m.concurrency)
    return Run(path=group[0].path, meta=meta, pods=conform("pods", pods),
               spans=conform("spans", None), memory=conform("memory", None),
               cpu=conform("cpu", None))


def figure(curves: list[Run], path: str) -> str:
    """RunPodSandbox CDFs, measured (pooled sessions) against predicted (pooled seeds)."""
    from reports.figures import latency_cdf, save

    scen = ", ".join(sorted({r.meta.scenario for r in curves}))
    fig = latency_cdf(curves, title=f"{scen}: measured (bench, pooled) vs model (sim)")
    return str(save(fig, path))


def render(scores: list[Score], threshold: float) -> str:
    head = ["chain", "flavor", "metric", "sessions", "measured", "95% interval", "spread",
            "predicted", "error", "verdict"]
    rows = [head]
    for s in scores:
        err, bias = s.error, s.bias
        ci = "-"
        if s.ci is not None and s.measured:
            ci = (f"{(s.ci[0] / s.measured - 1) * 100:+.0f}%.."
                  f"{(s.ci[1] / s.measured - 1) * 100:+.0f}%")
        verdict = "-" if err is None else ("ok" if err <= threshold else "FAIL")
        if verdict == "FAIL" and s.within_ci:
            verdict = "FAIL (inside the measured interval)"
        rows.append([s.chain, s.flavor, s.metric, str(s.sessions), _fmt(s.measured), ci,
                     "-" if s.spread is None else f"{s.spread * 100:.0f}%", _fmt(s.predicted),
                     "-" if bias is None else f"{bias * 100:+.1f}%", verdict])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate-on", nargs="+", required=True, metavar="DIR",
                    help="bench output dirs to fit from (sequential runs)")
    ap.add_argument("--validate-on", nargs="+", required=True, metavar="DIR",
                    help="held-out bench output dirs to predict (e.g. runc-c10)")
    ap.add_argument("--threshold", type=float, default=0.10,
                    help="largest acceptable relative error (default 0.10)")
    ap.add_argument("--replications", type=int, default=20,
                    help="seeds averaged per prediction (default 20)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-run", action="store_true",
                    help="score every held-out session alone instead of pooling the sessions "
                         "of one scenario and chain")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--core-limit", type=int, default=0, metavar="N",
                    help="what-if: at most N jobs share the cores, later ones wait in arrival "
                         "order (limited processor sharing; default 0: plain sharing)")
    ap.add_argument("--plot", metavar="PNG",
                    help="also draw the measured and predicted RunPodSandbox CDFs into PNG")
    ns = ap.parse_args(argv)
    if ns.threshold <= 0 or ns.replications < 1 or ns.core_limit < 0:
        print("chainbench validate: --threshold must be > 0, --replications >= 1 and "
              "--core-limit >= 0", file=sys.stderr)
        return 2
    curves: list[Run] | None = [] if ns.plot else None
    try:
        _, scores = validate(ns.calibrate_on, ns.validate_on, ns.replications, ns.seed,
                             pool=not ns.per_run, curves=curves, core_limit=ns.core_limit)
    except INPUT_ERRORS as exc:
        print(f"chainbench validate: {exc}", file=sys.stderr)
        return 2
    if ns.plot and curves:
        try:
            print(f"validate: figure {figure(curves, ns.plot)}", file=sys.stderr)
        except (OSError, ValueError) as exc:
            print(f"chainbench validate: cannot draw {ns.plot}: {exc}", file=sys.stderr)
            return 2
    failed = [s for s in scores if s.error is not None and s.error > ns.threshold]
    unscored = [s for s in scores if s.error is None]
    if ns.json:
        print(json.dumps({"threshold": ns.threshold, "passed": not failed,
                          "core_limit": ns.core_limit,
                          "scores": [s.to_json() for s in scores]}, indent=2))
    else:
        print(render(scores, ns.threshold))
        noise = sum(1 for s in failed if s.within_ci)
        print(f"\n{len(scores) - len(failed) - len(unscored)} within {ns.threshold:.0%}, "
              f"{len(failed)} above ({noise} of them inside the measurement's own 95% "
              f"interval), {len(unscored)} not scorable")
    return 1 if failed else 0
