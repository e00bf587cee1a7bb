"""Owns: the raw per-pod samples of a run, addressed by metric name (figures, report and gate).

Metric names are stable strings so a gate invocation can set a floor per metric:
`run_pod_sandbox`, `create_start`, `stop_remove` (client-side per-pod latencies) and
`step:<step>` (a RunPodSandbox step's per-pod duration) or `step:<Call>/<step>` for steps of
other CRI calls.  Values are in seconds, as stored; display code converts to ms.
Warm-up and failed pods are excluded, exactly as reports.summary does.  Runs of an A/B session
(`chainbench bench --variant ...`) record each pod's interleaving `block`; `sample_blocks` and
`pooled` carry it along for the gate's stratified test.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from reports.schema import Run
from sim.vocabulary import CALL_RUN_POD, RUN_POD_STEPS

POD_METRICS: dict[str, str] = {
    "run_pod_sandbox": "latency_s",
    "create_start": "create_start_s",
    "stop_remove": "stop_remove_s",
}
METRIC_TITLES: dict[str, str] = {
    "run_pod_sandbox": "RunPodSandbox latency",
    "create_start": "CreateContainer+StartContainer latency",
    "stop_remove": "Stop+Remove latency",
}


def ok_pods(run: Run) -> pd.DataFrame:
    """Measured pods: not warm-up, outcome ok."""
    p = run.pods
    return p[(~p["warmup"]) & (p["outcome"] == "ok")]


def label(run: Run, with_source: bool = True, with_conc: bool = False) -> str:
    m = run.meta
    s = f"{m.chain}/{m.flavor}"
    if with_conc:
        s += f" c={m.concurrency}"
    if with_source:
        s += f" ({m.source})"
    return s


def step_metric(call: str, step: str) -> str:
    return f"step:{step}" if call == CALL_RUN_POD else f"step:{call}/{step}"


def step_durations(run: Run, call: str | None = CALL_RUN_POD) -> pd.DataFrame:
    """Per-pod summed duration (s) of each step: index pod, one column per metric name."""
    sp = run.spans
    ok = set(ok_pods(run)["pod"])
    if sp.empty or not ok:
        return pd.DataFrame()
    sp = sp[sp["pod"].isin(ok)]
    if call is not None:
        sp = sp[sp["call"] == call]
    if sp.empty:
        return pd.DataFrame()
    dur = (sp["end_ns"] - sp["start_ns"]) / 1e9
    names = [step_metric(c, s) for c, s in zip(sp["call"], sp["step"])]
    # A step that repeats within a pod (retries) costs the pod the sum.
    return dur.groupby([sp["pod"].to_numpy(), np.asarray(names)]).sum().unstack()


def metric_names(run: Run) -> list[str]:
    names = [m for m, col in POD_METRICS.items() if ok_pods(run)[col].notna().any()]
    return names + list(step_durations(run, call=None).columns)


def sample(run: Run, metric: str) -> np.ndarray:
    """Raw per-pod samples (seconds) of `metric`; empty when the run has none."""
    if metric in POD_METRICS:
        col = ok_pods(run)[POD_METRICS[metric]].to_numpy(dtype=float)
        return col[np.isfinite(col)]
    if metric.startswith("step:"):
        df = step_durations(run, call=None)
        if metric not in getattr(df, "columns", ()):
            return np.array([], dtype=float)
        col = df[metric].to_numpy(dtype=float)
        return col[np.isfinite(col)]
    raise KeyError(f"unknown metric {metric!r}")


def sample_blocks(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`sample(run, metric)` with each sample's interleaving block (pods column `block`, written
    by an A/B bench session), or None when the run does not record blocks."""
    pods = ok_pods(run)
    has = "block" in pods.columns and pods["block"].notna().all() and bool(len(pods)) and \
        bool((pods["block"] >= 0).all())
    if metric in POD_METRICS:
        col = pods[POD_METRICS[metric]].to_numpy(dtype=float)
        keep = np.isfinite(col)
        return col[keep], (pods["block"].to_numpy()[keep].astype(int) if has else None)
    if metric.startswith("step:"):
        df = step_durations(run, call=None)
        if metric not in getattr(df, "columns", ()):
            return np.array([], dtype=float), (np.array([], dtype=int) if has else None)
        col = df[metric].to_numpy(dtype=float)
        keep = np.isfinite(col)
        if not has:
            return col[keep], None
        by_pod = dict(zip(pods["pod"], pods["block"].astype(int)))
        blocks = np.array([by_pod[p] for p in df.index], dtype=int)
        return col[keep], blocks[keep]
    raise KeyError(f"unknown metric {metric!r}")


def pooled(runs: Sequence[Run], metric: str,
           strata: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """All runs' samples, and with `strata` each sample's stratum "<session run_id>:<block>"
    (the runs must record blocks: see `same_sessions`)."""
    vals: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    for r in runs:
        x, blocks = sample_blocks(r, metric)
        vals.append(x)
        if strata:
            assert blocks is not None
            keys.append(np.array([f"{r.meta.extra.get('run_id')}:{b}" for b in blocks],
                                 dtype=object))
    x = np.concatenate(vals) if vals else np.array([], dtype=float)
    if not strata:
        return x, None
    return x, (np.concatenate(keys) if keys else np.array([], dtype=object))


def _sessions(runs: Sequence[Run]) -> set[str] | None:
    """The A/B sessions the runs come from; None unless every run records its pods' blocks."""
    out: set[str] = set()
    for r in runs:
        rid = r.meta.extra.get("run_id")
        p = r.pods
        if not rid or "block" not in p.columns or p.empty or p["block"].isna().any() \
                or (p["block"] < 0).any():
            return None
        out.add(str(rid))
    return out


def same_sessions(b_runs: Sequence[Run], c_runs: Sequence[Run]) -> bool:
    """Both sides' runs come from the same sessions and record blocks: one baseline and one
    candidate run per session, interleaved block by block."""
    sb, sc = _sessions(b_runs), _sessions(c_runs)
    return bool(sb) and sb == sc and len(b_runs) == len(sb) and len(c_runs) == len(sc)


def step_order(run: Run) -> list[str]:
    """RunPodSandbox step names in canonical order; steps outside it follow by start time."""
    canon = [r.step for r in RUN_POD_STEPS.get((run.meta.chain, run.meta.flavor), ())]
    sp = run.spans[run.spans["call"] == CALL_RUN_POD]
    seen = list(dict.fromkeys(sp.sort_values("start_ns")["step"].astype(str)))
    # The client's view of the whole call encloses every other step: it reads best on top.
    head = ["client.call"] if "client.call" in seen else []
    return head + [s for s in canon if s in seen] + [s for s in seen
                                                      if s not in canon and s not in head]


def merged_step_order(runs: list[Run]) -> list[str]:
    """One step order for several chains: each step at its mean relative position (0 = first,
    1 = last) in the runs that have it, so shim.spawn and sandbox.create line up mid-call."""
    pos: dict[str, list[float]] = {}
    for r in runs:
        order = step_order(r)
        for i, s in enumerate(order):
            pos.setdefault(s, []).append(i / max(1, len(order) - 1))
    first = list(pos)  # insertion order breaks ties deterministically
    return sorted(pos, key=lambda s: (float(np.mean(pos[s])), first.index(s)))


def median_pod(run: Run) -> str | None:
    """The measured pod whose RunPodSandbox latency is the (lower) median."""
    ok = ok_pods(run).dropna(subset=["latency_s"]).sort_values("latency_s")
    if ok.empty:
        return None
    return str(ok["pod"].iloc[(len(ok) - 1) // 2])


def step_table(runs: list[Run]) -> pd.DataFrame:
    """Tidy per-step statistics of RunPodSandbox spans (ms), with the lognormal fit calibration
    would use (median = exp(mu), sigma of log durations)."""
    rows = []
    for r in runs:
        d = step_durations(r)
        if d.empty:
            continue
        for step in step_order(r):
            col = f"step:{step}"
            if col not in d.columns:
                continue
            v = d[col].dropna().to_numpy(dtype=float) * 1e3
            v = v[v > 0]
            if v.size == 0:
                continue
            logs = np.log(v)
            rows.append({
                "chain": r.meta.chain, "flavor": r.meta.flavor, "source": r.meta.source,
                "scenario": r.meta.scenario, "step": step, "n": int(v.size),
                "p50_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95)),
                "cv": float(v.std(ddof=1) / v.mean()) if v.size > 1 else float("nan"),
                "lognorm_median_ms": float(np.exp(logs.mean())),
                "lognorm_sigma": float(logs.std(ddof=1)) if v.size > 1 else float("nan"),
            })
    return pd.DataFrame(rows)
