"""Owns: the cluster model — N nodes, arrivals placed on them, batches, and the results.

Nodes never interact once pods are placed (burst, Poisson and trace arrivals are all placed up
front), so the cluster runs as batches of identical-configuration nodes through sim.fast (or,
for proof and small runs, node by node through the reference SimPy model).  Results are kept
as rows when small, else as log-bucket histograms plus node 0's rows as a sample.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from scenarios.loader import Scenario
from sim import arrival as arrivals_mod
from sim.calibration import Calibration
from sim.chains import ChainModel, build_program, start_sequence, stop_sequence
from sim.fast import ensure_compiled, simulate_nodes
from sim.model import BLOCK, INF, NodeTimes, draw_nodes, simulate_node_naive
from sim.output import (cpu_seconds, ledger_rows, memory_rows, pod_rows, run_pod_steps,
                        span_rows)
from sim.scenario_model import SimSettings
from sim.sketch import LogHistogram

ROWS_LIMIT = 20_000  # pods; above it (aggregate = auto) keep histograms, not rows
BATCH_PODS = 262_144  # pods per fast batch: bounds memory (~60 bytes x steps per pod)
MIB = 1024 * 1024


class SimulationError(ValueError):
    """The scenario cannot be simulated as asked."""


@dataclass
class ChainRun:
    chain: str
    flavor: str
    total_pods: int
    pods: pd.DataFrame
    spans: pd.DataFrame
    memory: pd.DataFrame
    cpu: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    histograms: pd.DataFrame | None = None
    ledger: pd.DataFrame | None = None


def apply_what_ifs(model: ChainModel, s: SimSettings) -> ChainModel:
    for step, ms in s.step_ms.items():
        model = model.with_step_median(step, ms / 1e3)
    if s.vm_boot_ms is not None:
        model = model.with_step_median("vm.boot", s.vm_boot_ms / 1e3)
    if s.vm_restore_ms is not None:
        model = model.with_step_median("vm.restore", s.vm_restore_ms / 1e3)
    if s.shim_pss_mb is not None or s.shim_rss_mb is not None:
        model = model.with_memory(
            "shim", pss=None if s.shim_pss_mb is None else int(s.shim_pss_mb * MIB),
            rss=None if s.shim_rss_mb is None else int(s.shim_rss_mb * MIB))
    if s.vmm_pss_mb is not None:
        model = model.with_memory("vmm", pss=int(s.vmm_pss_mb * MIB))
    return model


class _Progress:
    def __init__(self, label: str, total: int, out: Callable[[str], None] | None) -> None:
        self.label, self.total, self.out = label, total, out
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self.out and (force or now - self.last >= 1.0):
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            self.out(f"simulate {self.label}: {done:,}/{self.total:,} pods "
                     f"({now - self.t0:.1f} s, {rate:,.0f} pods/s)")


def _run_batch(program: Any, d: np.ndarray, engine: str, concurrency: int,
               arr: np.ndarray | None, t0: np.ndarray | int = 0) -> NodeTimes:
    if engine == "fast":
        return simulate_nodes(program, d, concurrency=concurrency, arrivals=arr, t0=t0)
    t0v = np.broadcast_to(np.asarray(t0, dtype=np.int64), (d.shape[1],))
    parts = [simulate_node_naive(program, d[:, i], concurrency=concurrency,
                                 arrivals=None if arr is None else arr[i], t0=int(t0v[i]))
             for i in range(d.shape[1])]
    return NodeTimes(submit=np.stack([p.submit for p in parts]),
                     start=np.stack([p.start for p in parts], axis=1),
                     end=np.stack([p.end for p in parts], axis=1))


def blocks(pods: int, block: int, points: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """Pod index ranges run one after another with a barrier between them (bench's blocks:
    `block` pods at a time, never crossing a memory point).  block 0 = one range."""
    if block <= 0:
        return [(0, pods)]
    out = []
    lo = 0
    for p in sorted(set(q for q in points if 0 < q < pods) | {pods}):
        while lo < p:
            hi = min(p, lo + block)
            out.append((lo, hi))
            lo = hi
    return out


def _run_blocks(program: Any, d: np.ndarray, engine: str, concurrency: int,
                ranges: list[tuple[int, int]], t0: np.ndarray | int = 0) -> NodeTimes:
    """Closed loop over barrier blocks: each block starts when the previous one is done (the
    limits are idle then, so blocks are independent runs chained by their start instant)."""
    if len(ranges) == 1:
        return _run_batch(program, d, engine, concurrency, None, t0)
    start = np.empty_like(d)
    end = np.empty_like(d)
    submit = np.empty(d.shape[1:], dtype=np.int64)
    t = np.broadcast_to(np.asarray(t0, dtype=np.int64), (d.shape[1],)).copy()
    for lo, hi in ranges:
        part = _run_batch(program, d[:, :, lo:hi], engine, concurrency, None, t)
        start[:, :, lo:hi], end[:, :, lo:hi] = part.start, part.end
        submit[:, lo:hi] = part.submit
        t = part.done.max(axis=1)
    return NodeTimes(submit=submit, start=start, end=end)


def simulate_chain(scenario: Scenario, settings: SimSettings, cal: Calibration, chain: str,
                   progress: Callable[[str], None] | None = None) -> ChainRun:
    if scenario.lifetime_s > 0:
        raise SimulationError("lifetime_s > 0 (pods stopping while others start) is not "
                              "modelled yet; use lifetime_s = 0 (stop after the ramp)")
    wall0 = time.perf_counter()
    flavor = scenario.flavor
    model = apply_what_ifs(cal.model(chain, flavor, scenario.boot), settings)
    caps = settings.capacities(cal.node)
    arr = arrivals_mod.build(settings.arrival, nodes=settings.nodes, pods=scenario.pods,
                             rate=settings.rate, trace_path=settings.trace,
                             how=settings.placement, seed=settings.seed)
    pods, nodes = arr.pods_per_node, settings.nodes
    conc = int(scenario.concurrency)
    in_flight = min(conc, pods) if arr.times is None else pods
    prune = settings.engine == "fast"
    cps = int(scenario.containers_per_pod)
    sh = settings.core_sharing or cal.core_sharing
    lim = settings.core_limit
    prog = build_program(model, start_sequence(cps), caps, in_flight, prune, sh, lim)
    stop_prog = build_program(model, stop_sequence(cps), caps, min(conc, pods), prune, sh, lim)
    total = pods * nodes if arr.times is None else int((arr.times < INF).sum())
    mode = settings.aggregate
    if mode == "auto":
        mode = "rows" if total <= ROWS_LIMIT else "sketch"
    block = settings.block
    if block is None:  # bench's load driver: max(concurrency, 5) pods per barrier block
        block = max(conc, 5) if nodes == 1 and arr.times is None else 0
    points = _points(scenario, pods)
    ramp_blocks = blocks(pods, block, points)
    rp_last = run_pod_steps(prog)[-1]
    rp_steps = run_pod_steps(prog)
    label = f"{chain}/{flavor}"
    if settings.engine == "fast":
        ensure_compiled(progress)
    prog_bar = _Progress(label, total, progress)

    batch = max(1, BATCH_PODS // max(pods, 1))
    if batch >= BLOCK:
        batch -= batch % BLOCK
    hists = {k: LogHistogram() for k in ("run_pod_sandbox", "create_start_container",
                                         "stop_remove")}
    step_hists: dict[str, LogHistogram] = {}
    pod_parts: list[pd.DataFrame] = []
    span_parts: list[pd.DataFrame] = []
    cpu: dict[str, float] = {}
    mem_df = pd.DataFrame()
    ledger = pd.DataFrame()
    sub_min, ready_max, n_ok = np.inf, -np.inf, 0
    done_pods = 0
    for lo in range(0, nodes, batch):
        hi = min(nodes, lo + batch)
        node_ids = np.arange(lo, hi)
        d = draw_nodes(prog, seed=settings.seed, chain=chain, flavor=flavor, phase=0,
                       lo=lo, hi=hi, pods=pods)
        a = arr.for_nodes(lo, hi)
        if a is None:
            t = _run_blocks(prog, d, settings.engine, conc, ramp_blocks)
        else:
            t = _run_batch(prog, d, settings.engine, conc, a)
        valid = t.submit < INF
        stop_t = None
        if settings.stop and stop_prog.steps:
            barrier = np.where(valid, t.done, 0).max(axis=1)
            ds = draw_nodes(stop_prog, seed=settings.seed, chain=chain, flavor=flavor,
                            phase=1, lo=lo, hi=hi, pods=pods)
            if a is not None:  # open loop: stop the pods that existed, as bench would
                ds = np.where(valid[None], ds, 0)
            stop_t = _run_blocks(stop_prog, ds, settings.engine, conc,
                                 blocks(pods, block) if a is None else [(0, pods)], barrier)
            if a is not None:
                stop_t.submit[~valid] = INF
            for role, v in cpu_seconds(stop_prog, ds, valid).items():
                cpu[role] = cpu.get(role, 0.0) + v
        for role, v in cpu_seconds(prog, d, valid).items():
            cpu[role] = cpu.get(role, 0.0) + v
        if lo == 0:
            mem_df = memory_rows(model, prog, t.node(0), rp_last, points, cal.base_memory,
                                 barrier=block > 0)
            ledger = ledger_rows(model, prog, t.node(0), rp_last,
                                 None if stop_t is None else stop_t.done[0])
        ready = t.end[rp_last]
        measured = valid & (np.arange(pods) >= scenario.warmup_pods)[None, :]
        if measured.any():
            sub_min = min(sub_min, float(t.submit[measured].min()))
            ready_max = max(ready_max, float(ready[measured].max()))
            n_ok += int(measured.sum())
        if mode == "rows" or lo == 0:
            keep = slice(None) if mode == "rows" else slice(0, 1)
            sub_nodes = node_ids[keep]
            sub_t = t.nodes(keep)
            sub_stop = None if stop_t is None else stop_t.nodes(keep)
            pod_parts.append(pod_rows(sub_nodes, sub_t, rp_last, cps, sub_stop,
                                      scenario.warmup_pods))
            span_parts.append(span_rows(sub_nodes, prog, sub_t))
            if sub_stop is not None:
                span_parts.append(span_rows(sub_nodes, stop_prog, sub_stop))
        if mode == "sketch":
            hists["run_pod_sandbox"].add((ready - t.submit)[measured] / 1e9)
            if cps:
                hists["create_start_container"].add((t.done - ready)[measured] / 1e9)
            if stop_t is not None:
                hists["stop_remove"].add((stop_t.done - stop_t.submit)[measured] / 1e9)
            per_step: dict[str, np.ndarray] = {}
            for k in rp_steps:
                name = prog.steps[k].step
                dur = t.end[k] - t.start[k]
                per_step[name] = per_step.get(name, 0) + dur
            for name, dur in per_step.items():
                step_hists.setdefault(name, LogHistogram()).add(dur[measured] / 1e9)
        done_pods += int(valid.sum())
        prog_bar.update(done_pods)
    wall = time.perf_counter() - wall0

    pods_df = pd.concat(pod_parts, ignore_index=True) if pod_parts else pd.DataFrame()
    spans_df = pd.concat(span_parts, ignore_index=True) if span_parts else pd.DataFrame()
    extra: dict[str, Any] = {
        # the same keys bench's load driver records, so a sim run can be re-simulated alike
        "block": block, "memory_points": list(points), "boot": scenario.boot,
        "schema": scenario.schema,
        "model": {"engine": settings.engine, "settings": settings.to_json(),
                  "capacities": caps, "contended_limits": list(prog.limits),
                  "core_sharing": prog.sharing, "core_limit": prog.ps_limit,
                  "calibration": cal.provenance, "calibration_sources": cal.sources,
                  "nodes": nodes, "pods_per_node": pods, "rows": mode, "block": block,
                  "wall_s": round(wall, 3), "pods_per_wall_s": round(total / max(wall, 1e-9))},
    }
    hist_df = None
    if mode == "sketch":
        window = (ready_max - sub_min) / 1e9 if n_ok else 0.0

        def pct(h: LogHistogram, qs: tuple[int, ...]) -> dict[str, float | None]:
            return {f"p{q}": None if h.total == 0 else round(h.quantile(q / 100) * 1e3, 3)
                    for q in qs}

        extra["aggregate"] = {
            "pods": total, "measured_pods": n_ok, "errors": 0,
            "sample": "pods/spans hold node 0 only; figures here cover every node",
            "run_pod_sandbox_ms": pct(hists["run_pod_sandbox"], (50, 95, 99)),
            "pods_per_s": round(n_ok / window, 3) if window > 0 else None,
            "create_start_container_ms": pct(hists["create_start_container"], (50, 95)),
            "stop_remove_ms": pct(hists["stop_remove"], (50, 95)),
            "steps_ms": {k: pct(h, (50, 95)) for k, h in sorted(step_hists.items())},
            "sketch": "log buckets, 1% relative width",
        }
        rows = [r for k, h in hists.items() for r in h.rows(k)]
        rows += [r for k, h in step_hists.items() for r in h.rows(f"step:{k}")]
        hist_df = pd.DataFrame(rows)
    if progress:
        progress(f"simulate {label}: {total:,} pods in {wall:.2f} s "
                 f"({total / max(wall, 1e-9):,.0f} pods/s, engine {settings.engine})")
    return ChainRun(chain=chain, flavor=flavor, total_pods=total, pods=pods_df,
                    spans=spans_df, memory=mem_df, cpu=cpu, extra=extra, histograms=hist_df,
                    ledger=ledger)


def _points(scenario: Scenario, pods: int) -> tuple[int, ...]:
    pts = scenario.memory_points()
    if scenario.memory_at and max(pts) <= pods:
        return pts
    return tuple(sorted({0, pods // 4, pods // 2, (3 * pods) // 4, pods}))


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def modelled_chains(scenario: Scenario, cal: Calibration) -> list[str]:
    """Chains of the scenario the calibration can model (containerd is bench-only)."""
    return [c for c in scenario.chains if f"{c}/{scenario.flavor}" in cal.chains]

