"""Owns: processor sharing of a node's cores — the arithmetic and the reference SimPy server.

Linux does not run CPU work first-come-first-served: CFS gives every runnable thread a fair
share of the cores, so a 5 ms engine handler that wakes while runc's 50 ms bursts hold both
cores runs at once, slower, rather than after them.  Bench spans say the same (shim chain,
runc-c10 against runc-seq: task.create 46 -> 145 ms, shim.spawn 14 -> 73 ms, each stretched
by the number of pods burning CPU at once, while nobody waits in a queue for a core).  The
model's `sharing = "ps"` cores are an egalitarian processor-sharing server: with n jobs on c
cores each one is served at rate min(1, c / n).

Virtual time: V grows by dt * min(1, c / n) while n jobs are in; a job of work w arriving at
virtual time V0 leaves when V reaches its tag V0 + w.  Only the smallest tag matters for the
next departure, so a node's state is (V, t_last, n) and the tags.  V and the tags are float64
(service is not a whole number of ns); departure *instants* are whole ns, rounded up, so time
stays integer like everywhere else in the model.  The fast model (sim.fast_jit) and this
reference do exactly this arithmetic in the same order, so both give bit-identical results.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
import simpy

SHARING = ("fifo", "ps")
DEPARTURE_PRIORITY = 2  # simpy.events.NORMAL + 1


def advance(v: Any, dt: Any, n: Any, c: int) -> Any:
    """Virtual time after dt ns with n jobs in (scalars or arrays alike).

    Each job is served at min(1, c / n): V grows by dt * c / max(n, c), which is exactly dt
    while n <= c; it stands still while the cores are idle.  Written without branches, in
    the same operation order for numpy arrays and Python scalars (ints are exact in float64
    below 2**53 ns, about 104 days), so both give the same bits.
    """
    if isinstance(n, np.ndarray):
        return v + (dt * c * (n > 0)) / np.maximum(n, c)
    return v + (dt * c * (n > 0)) / max(n, c)


def due(t_last: Any, v: Any, tag: Any, n: Any, c: int) -> Any:
    """The instant (ns, rounded up) at which the job with `tag` leaves if nothing changes
    (n >= 1 jobs in): its missing service stretched by max(n, c) / c."""
    if isinstance(n, np.ndarray):
        gap = np.maximum(tag - v, 0.0)
        return t_last + np.ceil(gap * np.maximum(n, c) / c).astype(np.int64)
    gap = max(tag - v, 0.0)
    return t_last + math.ceil(gap * max(n, c) / c)


class PSCores:
    """The reference processor-sharing server of one node (SimPy).

    `limit` > 0 makes it limited processor sharing: at most `limit` jobs share the cores and
    later ones wait in arrival order, each let in (with its whole work) when one leaves.  A
    waiting job does not move virtual time; the fast model does the same."""

    def __init__(self, env: simpy.Environment, cores: int, limit: int = 0) -> None:
        self.env = env
        self.c = int(cores)
        self.limit = int(limit)
        self.v = 0.0
        self.t_last = int(env.now)
        self.jobs: dict[int, tuple[float, simpy.Event]] = {}
        self.waiting: deque[tuple[int, simpy.Event]] = deque()
        self._gen = 0
        self._key = 0

    def _advance(self) -> None:
        now = int(self.env.now)
        self.v = advance(self.v, now - self.t_last, len(self.jobs), self.c)
        self.t_last = now

    def run(self, work: int) -> simpy.Event:
        """An event that fires when `work` ns of CPU have been served to this job."""
        ev = self.env.event()
        if self.limit and len(self.jobs) >= self.limit:
            self.waiting.append((work, ev))
            return ev
        self._advance()
        self._key += 1
        self.jobs[self._key] = (self.v + work, ev)
        self._schedule()
        return ev

    def _schedule(self) -> None:
        self._gen += 1
        if not self.jobs:
            return
        gen = self._gen
        tag = min(t for t, _ in self.jobs.values())
        at = due(self.t_last, self.v, tag, len(self.jobs), self.c)
        # Below SimPy's NORMAL priority: a departure comes after every other event of its
        # instant, arrivals included (the fast model's order; with continuous latencies the
        # two coincide with probability ~0, but the order must be one and the same).
        timer = simpy.Event(self.env)
        timer._ok, timer._value = True, None
        timer.callbacks.append(lambda _e: self._fire(gen, tag))
        self.env.schedule(timer, DEPARTURE_PRIORITY, at - int(self.env.now))

    def _fire(self, gen: int, tag: float) -> None:
        if gen != self._gen:
            return  # superseded by a later arrival or departure
        self._advance()
        # Rounding the instant up means V reached the tag (up to float error): clamp, so the
        # job leaves now and never loops on an instant that is one ulp short.
        self.v = max(self.v, tag)
        gone = [k for k, (t, _) in self.jobs.items() if t <= self.v]
        for k in gone:
            _, ev = self.jobs.pop(k)
            ev.succeed()
        while self.waiting and len(self.jobs) < self.limit:
            work, ev = self.waiting.popleft()
            self._key += 1
            self.jobs[self._key] = (self.v + work, ev)
        self._schedule()
