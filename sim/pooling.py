"""Owns: pooling several bench sessions of one chain into one sample for calibration.

On this shared machine one sequential session's step latencies drift by tens of percent from
the next (sandbox RunPodSandbox p50 9.6 -> 20.7 ms over five sessions minutes apart), so a
calibration from several sessions fits their pods together: spans and pods are concatenated
(pod names made unique per session), the cpu table too (per-pod CPU is then total CPU over
total pods), and the memory samples (the per-pod slope is fitted over every session's points).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd


def _tag(df: pd.DataFrame, col: str, i: int) -> pd.DataFrame:
    if df.empty or col not in df.columns:
        return df
    return df.assign(**{col: f"s{i}/" + df[col].astype(str)})


def _shift_pids(df: pd.DataFrame, i: int) -> pd.DataFrame:
    if df.empty or "pid" not in df.columns or i == 0:
        return df
    return df.assign(pid=df["pid"] + i * (1 << 23))


def merge_sessions(runs: list[Any]) -> Any:
    """One run-like object holding every session's pods, spans, cpu and memory rows.

    Sessions must be of one chain and flavor with the same containers per pod (the caller
    groups them).  The first session's metadata stands for all, except the pod count, which
    is the sum (the cpu fit divides by it).
    """
    if len(runs) == 1:
        return runs[0]
    pods, spans, cpu, mem = [], [], [], []
    for i, r in enumerate(runs):
        pods.append(_tag(r.pods, "pod", i))
        spans.append(_tag(r.spans, "pod", i))
        # pids repeat across sessions: keep them apart (the memory fit counts processes by
        # pid), as integers above any real pid (pid_max is at most 2**22)
        cpu.append(_shift_pids(r.cpu, i))
        mem.append(_shift_pids(r.memory, i))

    def cat(parts: list[pd.DataFrame]) -> pd.DataFrame:
        full = [p for p in parts if not p.empty]
        return pd.concat(full, ignore_index=True) if full else parts[0]

    merged = replace(runs[0], pods=cat(pods), spans=cat(spans), cpu=cat(cpu), memory=cat(mem))
    # Roles whose CPU bench read exactly (from cgroups) in every session; a role exact in
    # some sessions only is treated as tick-rounded (a few ms too much on those rows).
    exact = set.intersection(*(set(r.meta.extra.get("cpu_exact_roles", ())) for r in runs))
    extra = dict(merged.meta.extra, cpu_exact_roles=sorted(exact))
    return replace(merged, meta=replace(merged.meta, extra=extra))
