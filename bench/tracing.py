"""Owns: span recording in testbed processes (engine, sandboxer, shim) and merging of span files.

Each process appends spans to its own JSON-lines file in a trace directory (no cross-process
locking on the hot path); the load driver merges the files into the run's `spans` table after
the run.  Timestamps are CLOCK_MONOTONIC (`time.perf_counter_ns` on Linux), so spans from
different processes on one host line up.  Records are buffered and flushed in batches so the
tracing cost stays well below the 2% budget of DESIGN §5.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator

from sim.vocabulary import check_step

_FLUSH_EVERY = 256
# Test-only knob (issue 6: proof that the gate catches a real slowdown): "STEP:FRACTION" makes
# every `aspan` of STEP sleep FRACTION x its own duration before it ends, e.g. task.create:0.3.
SLOWDOWN_ENV = "CHAINBENCH_SLOWDOWN"


def parse_slowdown(value: str | None) -> dict[str, float]:
    """`step:fraction[,step:fraction]` -> {step: fraction}; a typo fails loudly, not silently."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (value or "").split(","))):
        step, sep, frac = part.partition(":")
        if not sep:
            raise ValueError(f"{SLOWDOWN_ENV}: {part!r} is not STEP:FRACTION")
        check_step(step)
        f = float(frac)
        if not 0.0 <= f <= 10.0:
            raise ValueError(f"{SLOWDOWN_ENV}: fraction {f} outside [0, 10]")
        out[step] = f
    return out


class Tracer:
    """Collects spans; `path=None` makes a disabled tracer whose spans cost one branch."""

    def __init__(self, path: str | os.PathLike[str] | None, component: str) -> None:
        self.path = Path(path) if path else None
        self.component = component
        self._buf: list[str] = []
        self._lock = threading.Lock()
        self.slowdown = parse_slowdown(os.environ.get(SLOWDOWN_ENV))
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_dir(cls, trace_dir: str | os.PathLike[str] | None, component: str) -> "Tracer":
        if not trace_dir:
            return cls(None, component)
        return cls(Path(trace_dir) / f"{component}-{os.getpid()}.jsonl", component)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, pod: str, call: str, step: str, start_ns: int, end_ns: int,
               component: str | None = None) -> None:
        if self.path is None:
            return
        check_step(step)
        line = json.dumps({"pod": pod, "call": call, "step": step,
                           "component": component or self.component,
                           "start_ns": start_ns, "end_ns": end_ns})
        with self._lock:
            self._buf.append(line)
            full = len(self._buf) >= _FLUSH_EVERY
        if full:
            self.flush()

    @contextmanager
    def span(self, pod: str, call: str, step: str, component: str | None = None) -> Iterator[None]:
        """Time the body; the span is recorded even when the body raises (failed steps count)."""
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.record(pod, call, step, start, time.perf_counter_ns(), component)

    @asynccontextmanager
    async def aspan(self, pod: str, call: str, step: str,
                    component: str | None = None) -> AsyncIterator[None]:
        """Like `span`, for async bodies; honours the slowdown knob inside the timed region."""
        start = time.perf_counter_ns()
        try:
            yield
            await self.stretch(step, start)
        finally:
            self.record(pod, call, step, start, time.perf_counter_ns(), component)

    async def stretch(self, step: str, start_ns: int) -> None:
        """The slowdown knob: sleep the step's FRACTION of the time since start_ns (if any)."""
        extra = self.slowdown.get(step)
        if extra:
            await asyncio.sleep(extra * (time.perf_counter_ns() - start_ns) / 1e9)

    def flush(self) -> None:
        if self.path is None:
            return
        with self._lock:
            lines, self._buf = self._buf, []
        if lines:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")


def read_spans(trace_dir: str | os.PathLike[str]) -> list[dict[str, object]]:
    """All spans in a trace directory, skipping a torn last line of a killed process."""
    rows: list[dict[str, object]] = []
    for f in sorted(Path(trace_dir).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
