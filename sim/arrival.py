"""Owns: arrival processes and placement — when each pod is submitted and to which node.

Burst is bench's closed loop (`concurrency` workers per node, next pod when one is done), so it
has no arrival times.  Poisson and trace replay are open loop: cluster-level submit instants are
placed on nodes before any node runs, which keeps nodes independent (sim.fast relies on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.model import INF, NS


class ArrivalError(ValueError):
    """An arrival process cannot be built (bad trace file, rate, placement)."""


@dataclass
class Arrivals:
    """Per-node submit instants (nodes, pods) in ns, INF-padded; None = closed loop."""

    times: np.ndarray | None
    pods_per_node: int

    def for_nodes(self, lo: int, hi: int) -> np.ndarray | None:
        return None if self.times is None else self.times[lo:hi]


def _place(t_ns: np.ndarray, node_of: np.ndarray, nodes: int) -> np.ndarray:
    order = np.lexsort((t_ns, node_of))
    node_sorted = node_of[order]
    counts = np.bincount(node_sorted, minlength=nodes)
    width = int(counts.max()) if counts.size else 0
    out = np.full((nodes, max(width, 1)), INF, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(order.size) - np.repeat(starts, counts)
    out[node_sorted, slot] = t_ns[order]
    return out


def placement(t_ns: np.ndarray, nodes: int, how: str, rng: np.random.Generator,
              node_hint: np.ndarray | None = None) -> np.ndarray:
    if node_hint is not None:
        if node_hint.min() < 0 or node_hint.max() >= nodes:
            raise ArrivalError(f"trace node ids must be in [0, {nodes})")
        return _place(t_ns, node_hint.astype(np.int64), nodes)
    if how == "round_robin":
        node_of = np.argsort(np.argsort(t_ns, kind="stable"), kind="stable") % nodes
    elif how == "random":
        node_of = rng.integers(0, nodes, size=t_ns.size)
    else:
        raise ArrivalError(f"unknown placement {how!r}")
    return _place(t_ns, node_of.astype(np.int64), nodes)


def poisson(rate: float, total: int, nodes: int, how: str, seed: int) -> Arrivals:
    if rate <= 0:
        raise ArrivalError("poisson arrivals need rate > 0")
    rng = np.random.default_rng([int(seed), 0xA221])
    t = np.rint(np.cumsum(rng.exponential(1.0 / rate, size=total)) * NS).astype(np.int64)
    times = placement(t, nodes, how, rng)
    return Arrivals(times=times, pods_per_node=times.shape[1])


def read_trace(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise ArrivalError(f"trace file {path} not found")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise ArrivalError(f"trace file {path}: {exc}") from exc
    if "submit_s" not in df.columns:
        raise ArrivalError(f"trace file {path} needs a submit_s column; has {list(df.columns)}")
    sub = pd.to_numeric(df["submit_s"], errors="coerce")
    if sub.isna().any() or (sub < 0).any() or len(sub) == 0:
        raise ArrivalError(f"trace file {path}: submit_s must be numbers >= 0")
    return df


def trace(path: str, nodes: int, how: str, seed: int) -> Arrivals:
    df = read_trace(path)
    t = np.rint(df["submit_s"].to_numpy(dtype=float) * NS).astype(np.int64)
    t -= t.min()
    hint = df["node"].to_numpy() if "node" in df.columns else None
    rng = np.random.default_rng([int(seed), 0x7ACE])
    times = placement(t, nodes, how, rng, hint)
    return Arrivals(times=times, pods_per_node=times.shape[1])


def build(arrival: str, *, nodes: int, pods: int, rate: float = 0.0, trace_path: str = "",
          how: str = "round_robin", seed: int = 1) -> Arrivals:
    if arrival == "burst":
        return Arrivals(times=None, pods_per_node=pods)
    if arrival == "poisson":
        return poisson(rate, pods * nodes, nodes, how, seed)
    if arrival == "trace":
        return trace(trace_path, nodes, how, seed)
    raise ArrivalError(f"unknown arrival process {arrival!r}")
