"""Owns: the summary figures of a run (DESIGN §4 JSON) computed from its raw tables.

Summaries are always derived from raw samples, never stored, so a fixed bug here fixes every
old run too.  Warm-up pods and failed pods are excluded from latency percentiles.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from reports.schema import Run, load_runs
from sim.vocabulary import CALL_RUN_POD, MGMT_ROLES, VMM_ROLES

MB = 1024.0 * 1024.0


def _pct(values: Iterable[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in qs}


def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    """Least-squares slope of y over x; None when x does not vary (one pod count only)."""
    if x.size < 2 or float(np.ptp(x)) == 0.0:
        return None
    return float(np.polyfit(x.astype(float), y.astype(float), 1)[0])


def memory_per_pod(memory: pd.DataFrame, roles: frozenset[str]) -> dict[str, float | None]:
    """Slope of the roles' summed PSS/RSS and process count over live pods (per sample time)."""
    m = memory[memory["role"].isin(sorted(roles))]
    if m.empty:
        return {"pss_mb": None, "rss_mb": None, "procs": None}
    # Every sample instant must appear even if no role process existed then (0 pods -> 0 shims).
    times = memory.groupby("t_s")["pods_alive"].max()
    agg = m.groupby("t_s").agg(pss=("pss", "sum"), rss=("rss", "sum"), procs=("pid", "nunique"))
    agg = agg.reindex(times.index, fill_value=0)
    x = times.to_numpy()
    out: dict[str, float | None] = {}
    for key, col, scale in (("pss_mb", "pss", MB), ("rss_mb", "rss", MB), ("procs", "procs", 1.0)):
        s = _slope(x, agg[col].to_numpy())
        # `+ 0.0` turns a rounded -0.0 (flat slope) into 0.0 for display and JSON.
        out[key] = None if s is None else round(s / scale, 4) + 0.0
    return out


def summarize(run: Run) -> dict[str, Any]:
    meta = run.meta
    pods = run.pods
    measured = pods[~pods["warmup"]]
    ok = measured[measured["outcome"] == "ok"]
    errors = int((pods["outcome"] != "ok").sum())
    lat_ms = ok["latency_s"] * 1e3
    pods_per_s: float | None = None
    if len(ok) >= 1:
        window = float(ok["ready_s"].max() - measured["submit_s"].min())
        if window > 0:
            pods_per_s = round(len(ok) / window, 3)

    spans = run.spans
    steps_ms: dict[str, dict[str, float | None]] = {}
    if not spans.empty:
        sp = spans[(spans["call"] == CALL_RUN_POD) & spans["pod"].isin(set(ok["pod"]))]
        dur = (sp["end_ns"] - sp["start_ns"]) / 1e6
        # A step may occur more than once per pod (retries): within one component a pod's cost
        # is the sum.  Two components may time the same step (the engine around the RPC, the
        # sandboxer inside it): the outer view already contains the inner one, so take the max.
        per_comp = dur.groupby([sp["pod"], sp["step"], sp["component"]]).sum()
        per_pod = per_comp.groupby(level=["pod", "step"]).max()
        for step, vals in per_pod.groupby(level="step"):
            steps_ms[str(step)] = _pct(vals.to_numpy(), (50, 95))

    mgmt = memory_per_pod(run.memory, MGMT_ROLES)
    vmm = memory_per_pod(run.memory, VMM_ROLES)
    out = {
        "chain": meta.chain,
        "flavor": meta.flavor,
        "source": meta.source,
        "scenario": meta.scenario,
        "path": str(run.path),
        "pods": int(len(pods)),
        "warmup_pods": int(pods["warmup"].sum()),
        "concurrency": int(meta.concurrency),
        "errors": errors,
        "accel": meta.host.accel,
        "run_pod_sandbox_ms": _pct(lat_ms, (50, 95, 99)),
        "pods_per_s": pods_per_s,
        "create_start_container_ms": _pct(ok["create_start_s"] * 1e3, (50, 95)),
        "stop_remove_ms": _pct(ok["stop_remove_s"] * 1e3, (50, 95)),
        "mgmt_pss_mb_per_pod": mgmt["pss_mb"],
        "mgmt_rss_mb_per_pod": mgmt["rss_mb"],
        "mgmt_procs_per_pod": mgmt["procs"],
        "vmm_pss_mb_per_pod": vmm["pss_mb"],
        "steps_ms": steps_ms,
    }
    if meta.extra.get("variant"):  # an A/B lane: which code revision produced it
        out["variant"] = meta.extra["variant"]
    agg = meta.extra.get("aggregate")
    if agg:
        # Large simulated runs keep per-pod rows for a sample only; their cluster-wide
        # figures (from quantile sketches over every pod) are in run.json and take precedence.
        for key in ("pods", "errors", "run_pod_sandbox_ms", "pods_per_s",
                    "create_start_container_ms", "stop_remove_ms", "steps_ms"):
            if key in agg:
                out[key] = agg[key]
        out["sampled"] = agg.get("sample", True)
    return out


def summarize_paths(paths: Iterable[str]) -> dict[str, Any]:
    return {"runs": [summarize(r) for r in load_runs(paths)]}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render_table(summary: dict[str, Any]) -> str:
    """A fixed-width text table for terminals (the JSON form is for machines)."""
    head = ["chain", "flavor", "source", "scenario", "pods", "conc", "err", "RunPod p50 ms",
            "p95", "p99", "pods/s", "C+S p50 ms", "mgmt PSS MB/pod", "procs/pod"]
    rows = [head]
    for r in summary["runs"]:
        rp = r["run_pod_sandbox_ms"]
        chain = r["chain"] + (f"@{r['variant']}" if r.get("variant") else "")
        rows.append([
            chain, r["flavor"], r["source"], r["scenario"], r["pods"], r["concurrency"],
            r["errors"], rp["p50"], rp["p95"], rp["p99"], r["pods_per_s"],
            r["create_start_container_ms"]["p50"], r["mgmt_pss_mb_per_pod"],
            r["mgmt_procs_per_pod"],
        ])
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
