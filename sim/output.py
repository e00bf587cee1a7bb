"""Owns: turning simulated timelines into the run-directory tables bench writes (DESIGN §4).

Simulated time starts at 0 ns; spans carry the same call/step/component names as bench spans;
memory is sampled at the scenario's live-pod counts on node 0 (memory is a per-node quantity),
and node 0's whole ledger (every allocation and release over time) goes to `ledger.parquet`;
CPU is the sum of each step's CPU part per role.  Large runs add `histograms.parquet` (one row
per log bucket and metric) and the cluster-wide figures in run.json `extra.aggregate`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports.schema import HostFacts, RunMeta, write_run
from sim.calibration import OFFPATH_STEPS
from sim.chains import ChainModel, Program
from sim.model import INF, NodeTimes
from sim.vocabulary import CALL_RUN_POD

# Role whose CPU a component's work is charged to.
ROLE_OF = {"engine": "engine", "shim": "shim", "runc": "shim", "sandboxer": "sandboxer",
           "vmm": "vmm", "agent": "vmm", "containerd": "containerd"}


def pod_names(nodes: np.ndarray, pods: int) -> np.ndarray:
    return np.array([f"n{n}-p{p}" for n in nodes.tolist() for p in range(pods)], dtype=object)


def pod_rows(nodes: np.ndarray, start: NodeTimes, rp_last: int, containers: int,
             stop: NodeTimes | None, warmup: int) -> pd.DataFrame:
    b, pods = start.submit.shape
    valid = (start.submit < INF).ravel()
    sub = start.submit.ravel().astype(float) / 1e9
    ready = start.end[rp_last].ravel().astype(float) / 1e9
    done = start.done.ravel().astype(float) / 1e9
    cs = (done - ready) if containers > 0 else np.full(sub.shape, np.nan)
    if stop is not None:
        sr = (stop.done - stop.submit).ravel().astype(float) / 1e9
    else:
        sr = np.full(sub.shape, np.nan)
    df = pd.DataFrame({
        "pod": pod_names(nodes, pods), "submit_s": sub, "ready_s": ready,
        "latency_s": ready - sub, "create_start_s": cs, "stop_remove_s": sr,
        "outcome": "ok", "error": "",
        "warmup": np.tile(np.arange(pods) < warmup, b),
        "node": np.repeat(nodes, pods),
    })
    return df[valid].reset_index(drop=True)


def span_rows(nodes: np.ndarray, program: Program, t: NodeTimes) -> pd.DataFrame:
    """One row per step plus one `client.call` envelope per call instance, per pod."""
    k, b, pods = t.start.shape
    if k == 0:
        return pd.DataFrame()
    live = (t.submit < INF).ravel()
    names = pod_names(nodes, pods)
    steps = program.steps

    def rows_of(idx: np.ndarray, step_names: Any, comps: Any, starts: np.ndarray,
                ends: np.ndarray) -> pd.DataFrame:
        n = len(idx)
        return pd.DataFrame({
            "pod": np.repeat(names, n),
            "call": np.tile(np.array([steps[i].call for i in idx], dtype=object), b * pods),
            "step": np.tile(np.asarray(step_names, dtype=object), b * pods),
            "component": np.tile(np.asarray(comps, dtype=object), b * pods),
            # (steps, nodes, pods) -> pod-major rows
            "start_ns": starts.transpose(1, 2, 0).reshape(-1),
            "end_ns": ends.transpose(1, 2, 0).reshape(-1),
        })[np.repeat(live, n)]

    all_idx = np.arange(k)
    df = rows_of(all_idx, [s.step for s in steps], [s.component for s in steps],
                 t.start, t.end)
    inst = np.asarray(program.instance)
    firsts = np.flatnonzero(np.r_[True, inst[1:] != inst[:-1]])
    lasts = np.r_[firsts[1:] - 1, k - 1]
    env = rows_of(firsts, ["client.call"] * len(firsts), ["client"] * len(firsts),
                  t.start[firsts], t.end[lasts])
    return pd.concat([df, env], ignore_index=True)


def step_index(program: Program, key: str) -> int | None:
    call, _, step = key.partition("/")
    for i, s in enumerate(program.steps):
        if s.call == call and s.step == step:
            return i
    return None


def memory_rows(model: ChainModel, program: Program, t: NodeTimes, rp_last: int,
                points: tuple[int, ...], base: dict[str, dict[str, int]],
                barrier: bool = False) -> pd.DataFrame:
    """Samples of one node at each live-pod count in `points` while pods accumulate.

    With barrier blocks (bench) the sample is taken when the block ending at the point is
    done; else when the m-th pod's RunPodSandbox returns.
    """
    live = t.submit < INF
    ready = np.sort(t.end[rp_last][live])
    done = t.done
    rows: list[dict[str, Any]] = []
    long_lived = ["engine"] + (["sandboxer"] if model.chain == "sandbox" else [])
    items = [(m, step_index(program, m.after)) for m in model.memory]
    for m_alive in points:
        if m_alive > ready.size:
            continue
        if m_alive == 0:
            at = 0
        elif barrier:
            at = int(done[:m_alive].max())
        else:
            at = int(ready[m_alive - 1])
        t_s = at / 1e9
        for pid, role in enumerate(long_lived, start=1):
            b = base.get(role, {})
            row = {"t_s": t_s, "role": role, "pid": pid, "rss": int(b.get("rss", 0)),
                   "pss": int(b.get("pss", 0)), "uss": int(b.get("uss", 0)),
                   "threads": int(b.get("threads", 1)), "pods_alive": m_alive}
            for m, k in items:
                if m.shared and m.role == role:
                    n = int((t.end[k if k is not None else rp_last] <= at).sum()) \
                        if m_alive else 0
                    row["pss"] += n * m.pss
                    row["rss"] += n * m.rss
                    row["uss"] += n * m.uss
            rows.append(row)
        if m_alive == 0:
            continue
        for j, (m, k) in enumerate(items):
            if m.shared:
                continue
            alive = np.flatnonzero(t.end[k if k is not None else rp_last] <= at)
            for p in alive.tolist():
                rows.append({"t_s": t_s, "role": m.role, "pid": 100_000 + p * 16 + j,
                             "rss": m.rss, "pss": m.pss, "uss": m.uss, "threads": m.threads,
                             "pods_alive": m_alive})
    return pd.DataFrame(rows)


def ledger_rows(model: ChainModel, program: Program, t: NodeTimes, rp_last: int,
                removed: np.ndarray | None) -> pd.DataFrame:
    """Node 0's memory ledger over time: every instant a pod adds or frees memory, with the
    running totals per role (PSS/RSS bytes, processes) and the pods alive then.

    A pod's process appears when its `after` step ends and goes when its RemovePodSandbox
    ends (never, when stop/remove is not modelled).
    """
    live = t.submit < INF
    ev_t: list[np.ndarray] = []
    ev_role: list[np.ndarray] = []
    ev_sign: list[np.ndarray] = []
    ev_pss: list[np.ndarray] = []
    ev_rss: list[np.ndarray] = []
    ev_proc: list[np.ndarray] = []
    ev_pod: list[np.ndarray] = []
    ready = t.end[rp_last][live]
    gone = removed[live] if removed is not None else np.full(ready.shape, INF)
    for m in model.memory:
        k = step_index(program, m.after)
        born = t.end[k if k is not None else rp_last][live]
        for when, sign in ((born, 1), (gone, -1)):
            keep = when < INF
            n = int(keep.sum())
            ev_t.append(when[keep])
            ev_role.append(np.full(n, m.role, dtype=object))
            ev_sign.append(np.full(n, sign))
            ev_pss.append(np.full(n, sign * m.pss))
            ev_rss.append(np.full(n, sign * m.rss))
            ev_proc.append(np.full(n, 0 if m.shared else sign))
            ev_pod.append(np.zeros(n, dtype=np.int64))
    # pods alive: +1 when RunPodSandbox returns, -1 when the pod is removed
    for when, sign in ((ready, 1), (gone, -1)):
        keep = when < INF
        n = int(keep.sum())
        ev_t.append(when[keep])
        ev_role.append(np.full(n, "", dtype=object))
        ev_sign.append(np.full(n, sign))
        for lst in (ev_pss, ev_rss, ev_proc):
            lst.append(np.zeros(n, dtype=np.int64))
        ev_pod.append(np.full(n, sign))
    if not ev_t:
        return pd.DataFrame()
    df = pd.DataFrame({"t_ns": np.concatenate(ev_t), "role": np.concatenate(ev_role),
                       "pss": np.concatenate(ev_pss), "rss": np.concatenate(ev_rss),
                       "procs": np.concatenate(ev_proc), "dpods": np.concatenate(ev_pod)})
    # at one instant, count the pod first so a removal row shows the pods left after it
    df["pri"] = (df["role"] != "").astype(int)
    df = df.sort_values(["t_ns", "pri"], kind="stable").reset_index(drop=True)
    df["pods_alive"] = df["dpods"].cumsum()
    out = df[df["role"] != ""].copy()
    for col in ("pss", "rss", "procs"):
        out[f"{col}_total"] = out.groupby("role")[col].cumsum()
    out["t_s"] = out["t_ns"] / 1e9
    return out[["t_s", "role", "pss", "rss", "pss_total", "rss_total", "procs_total",
                "pods_alive"]].reset_index(drop=True)


def cpu_seconds(program: Program, d: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """CPU seconds per role: each step's CPU fraction of its latency, summed over pods."""
    flat = d.reshape(d.shape[0], -1)
    v = valid.ravel()
    per_step = (flat.sum(axis=1) if v.all() else flat[:, v].sum(axis=1)).astype(float) / 1e9
    out: dict[str, float] = {}
    for s, tot in zip(program.steps, per_step.tolist()):
        role = ROLE_OF.get(s.component)
        if role:
            out[role] = out.get(role, 0.0) + s.cpu * tot
    if any(s.offpath for s in program.steps):
        role_at = {at: r for r, at in OFFPATH_STEPS.items()}
        n = int(v.sum())
        for s in program.steps:
            if s.offpath:
                role = role_at.get((s.call, s.step), "offpath")
                out[role] = out.get(role, 0.0) + s.offpath * n
    return out


def write_chain_run(out_dir: str | Path, *, scenario: Any, chain: str, flavor: str,
                    pods: pd.DataFrame, spans: pd.DataFrame, memory: pd.DataFrame,
                    cpu: dict[str, float], extra: dict[str, Any], total_pods: int,
                    histograms: pd.DataFrame | None, accel: str = "",
                    ledger: pd.DataFrame | None = None) -> Path:
    meta = RunMeta(scenario=scenario.name, source="sim", chain=chain, flavor=flavor,
                   scenario_digest=scenario.digest, pods=int(total_pods),
                   concurrency=int(scenario.concurrency),
                   containers_per_pod=int(scenario.containers_per_pod),
                   warmup_pods=int(scenario.warmup_pods),
                   host=HostFacts.collect(accel=accel), extra=extra)
    cpu_df = pd.DataFrame([{"role": r, "pid": 0, "cpu_s": v} for r, v in sorted(cpu.items())])
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    if histograms is not None and not histograms.empty:
        histograms.to_parquet(path / "histograms.parquet", index=False)
    if ledger is not None and not ledger.empty:
        ledger.to_parquet(path / "ledger.parquet", index=False)
    return write_run(path, meta, pods=pods if not pods.empty else None,
                     spans=spans if not spans.empty else None,
                     memory=memory if not memory.empty else None,
                     cpu=cpu_df if not cpu_df.empty else None)


def run_pod_steps(program: Program) -> list[int]:
    return [i for i, s in enumerate(program.steps) if s.call == CALL_RUN_POD]
