"""Owns: the log-bucket histogram that keeps a million latencies in a few hundred counts.

Buckets are geometric (1% wide by default), so any quantile read back is within 1% of the true
sample quantile; histograms of the same `gamma` merge by adding counts (per batch, per node).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LogHistogram:
    gamma: float = 1.01
    floor: float = 1e-6  # values below (seconds) share bucket 0
    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0
    vmin: float = math.inf
    vmax: float = -math.inf
    vsum: float = 0.0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        b = self._bucket(v)
        keys, cnt = np.unique(b, return_counts=True)
        for k, c in zip(keys.tolist(), cnt.tolist()):
            self.counts[k] = self.counts.get(k, 0) + c
        self.total += int(v.size)
        self.vmin = min(self.vmin, float(v.min()))
        self.vmax = max(self.vmax, float(v.max()))
        self.vsum += float(v.sum())

    def merge(self, other: "LogHistogram") -> None:
        if other.gamma != self.gamma:
            raise ValueError("cannot merge histograms of different gamma")
        for k, c in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + c
        self.total += other.total
        self.vmin = min(self.vmin, other.vmin)
        self.vmax = max(self.vmax, other.vmax)
        self.vsum += other.vsum

    def _bucket(self, v: np.ndarray) -> np.ndarray:
        x = np.maximum(v, self.floor) / self.floor
        return np.floor(np.log(x) / math.log(self.gamma)).astype(np.int64)

    def bounds(self, k: int) -> tuple[float, float]:
        return self.floor * self.gamma ** k, self.floor * self.gamma ** (k + 1)

    def quantile(self, q: float) -> float | None:
        """Value at quantile q (0..1): the geometric middle of the bucket holding it."""
        if self.total == 0:
            return None
        rank = q * (self.total - 1)
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen > rank:
                lo, hi = self.bounds(k)
                return float(min(max(math.sqrt(lo * hi), self.vmin), self.vmax))
        return self.vmax

    def rows(self, metric: str) -> list[dict[str, object]]:
        out = []
        for k in sorted(self.counts):
            lo, hi = self.bounds(k)
            out.append({"metric": metric, "lo_s": lo, "hi_s": hi, "count": self.counts[k]})
        return out
