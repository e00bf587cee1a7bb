"""Owns: the node model — the random realisation of step costs and the reference SimPy node.

A node has cores and worker pools (FIFO, one `simpy.Resource` per contended limit) and runs
pods through a `Program`.  With `sharing = "ps"` the cores are a processor-sharing server
instead (sim.cores.PSCores): every step on them runs at once, at min(1, cores / n) speed.  A
two-limit step requests its pool, then (still holding it) a core for its CPU part, so a
handler waiting for a core keeps its worker busy.  Time is integer
nanoseconds so that adding a run of step latencies at once gives exactly the same instant as
adding them one by one — that is what lets the fast model (sim.fast) fold steps and still
equal this reference bit for bit.

The realisation (every step latency of every pod of a node) is drawn up front from a stream
that depends only on (seed, chain, flavor, node, phase), never on event order, so the reference
model and the fast one see the same numbers and a node's draws do not change with the size of
the cluster around it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import simpy

from sim.chains import Program
from sim.cores import PSCores

NS = 1_000_000_000
# "Never": larger than any simulated instant, small enough that adding a latency cannot overflow.
INF = np.int64(1) << np.int64(62)


# Nodes draw their latencies in blocks of BLOCK nodes from one stream per block: a node's draws
# depend on (seed, chain, flavor, phase, block, pods per node), not on the batch it runs in.
BLOCK = 256


def block_rng(seed: int, chain: str, flavor: str, block: int, phase: int) -> np.random.Generator:
    key = zlib.crc32(f"{chain}/{flavor}".encode())
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence(entropy=int(seed), spawn_key=(key, int(phase), int(block)))))


def _draw_block(program: Program, rng: np.random.Generator, pods: int) -> np.ndarray:
    k = len(program.steps)
    out = np.empty((k, BLOCK, pods), dtype=np.int64)
    zero = np.zeros((BLOCK, pods))
    for i, s in enumerate(program.steps):
        # Only the draws a family needs, so const steps cost nothing.
        z = rng.standard_normal((BLOCK, pods)) if s.dist.kind == "lognormal" else zero
        u = rng.random((BLOCK, pods)) if s.dist.kind == "empirical" else zero
        sec = s.dist.sample(z, u)
        np.rint(np.maximum(sec, 0.0) * NS, out=sec)
        out[i] = sec
    return out


def draw_nodes(program: Program, *, seed: int, chain: str, flavor: str, phase: int,
               lo: int, hi: int, pods: int) -> np.ndarray:
    """Step latencies (steps, hi - lo, pods) in integer ns for nodes lo..hi-1 (step-major:
    every per-step pass over a batch reads contiguous memory)."""
    b0, b1 = lo // BLOCK, (hi - 1) // BLOCK
    parts = [_draw_block(program, block_rng(seed, chain, flavor, b, phase), pods)
             for b in range(b0, b1 + 1)]
    whole = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return whole[:, lo - b0 * BLOCK: hi - b0 * BLOCK]


def hold_ns(program: Program, d: np.ndarray, k: int) -> np.ndarray:
    """The part of step k's latency during which it holds its limit."""
    return (d[k] * program.hold[k]).astype(np.int64)


def core_hold_ns(program: Program, d: np.ndarray, k: int) -> np.ndarray:
    """The part of two-limit step k's latency it holds a core (inside its pool's hold)."""
    ch = program.core_hold[k] if program.core_hold else 0.0
    return (d[k] * ch).astype(np.int64)


@dataclass
class NodeTimes:
    """When each pod was submitted and when each of its steps started and ended (ns).

    Step-major: start[k] is step k of every pod; submit has the trailing shape (..., pods).
    """

    submit: np.ndarray  # (..., pods)
    start: np.ndarray  # (steps, ..., pods)
    end: np.ndarray  # (steps, ..., pods)

    @property
    def done(self) -> np.ndarray:
        return self.end[-1] if self.end.shape[0] else self.submit

    def node(self, i: int) -> "NodeTimes":
        return NodeTimes(self.submit[i], self.start[:, i], self.end[:, i])

    def nodes(self, sl: slice) -> "NodeTimes":
        return NodeTimes(self.submit[sl], self.start[:, sl], self.end[:, sl])


def step_times(program: Program, d: np.ndarray, submit: np.ndarray,
               grant: np.ndarray) -> NodeTimes:
    """Start/end of every step from submit times and the grant time of each contended step.

    A free step starts when the previous one ends and lasts its latency; a contended step starts
    (asks for its limit) when the previous ends and ends its latency after the grant.
    """
    start = np.empty(d.shape, dtype=np.int64)
    end = np.empty(d.shape, dtype=np.int64)
    cur = submit.astype(np.int64, copy=True)
    j = 0
    first = program.free_first
    for k, r in enumerate(program.limit_index):
        start[k] = cur
        if r >= 0:
            # a wait-first step ends when it lets go of its limit (its free part came first)
            np.add(grant[j], hold_ns(program, d, k) if first[k] else d[k], out=end[k])
            j += 1
        else:
            np.add(cur, d[k], out=end[k])
        cur = end[k]
    never = submit >= INF  # padding: pods that were never submitted
    if never.any():
        start[:, never] = INF
        end[:, never] = INF
    return NodeTimes(submit=submit, start=start, end=end)


def simulate_node_naive(program: Program, d: np.ndarray, *, concurrency: int | None = None,
                        arrivals: np.ndarray | None = None, t0: int = 0) -> NodeTimes:
    """The reference model: plain SimPy, one process per pod and per step, FIFO pools and
    FIFO or processor-shared cores.

    Closed loop (bench's load driver): `concurrency` workers each take the next pod when their
    previous one is done.  Open loop: pod i is submitted at `arrivals[i]` (INF = never).
    """
    k, pods = d.shape
    h = np.stack([hold_ns(program, d, i) for i in range(k)]) if k else d.copy()
    ch = np.stack([core_hold_ns(program, d, i) for i in range(k)]) if k else d.copy()
    env = simpy.Environment(initial_time=int(t0))
    res = [simpy.Resource(env, capacity=c) for c in program.capacities]
    submit = np.full(pods, INF, dtype=np.int64)
    start = np.full((k, pods), INF, dtype=np.int64)
    end = np.full((k, pods), INF, dtype=np.int64)
    lim = program.limit_index
    two = [bool(program.core_hold) and program.core_hold[i] > 0 for i in range(k)]
    cores = program.core_index
    ps = (PSCores(env, program.capacities[cores], program.ps_limit)
          if program.shares_cores else None)

    def on_cores(work: int) -> Iterator[simpy.Event]:
        if ps is not None:
            if work:  # no CPU, nothing to share: the step goes on at once
                yield ps.run(work)
            return
        with res[cores].request() as creq:
            yield creq
            if work:
                yield env.timeout(work)

    first = program.free_first
    off = program.offpath or (0,) * k

    def step(p: int, i: int) -> Iterator[simpy.Event]:
        start[i, p] = env.now
        r = lim[i]
        if r >= 0 and first[i]:
            # The free part first, then the limit; the step ends when it lets go of it.
            if d[i, p] - h[i, p]:
                yield env.timeout(int(d[i, p] - h[i, p]))
            if two[i]:
                with res[r].request() as req:
                    yield req
                    yield from on_cores(int(ch[i, p]))
                    if h[i, p] - ch[i, p]:
                        yield env.timeout(int(h[i, p] - ch[i, p]))
            elif r == cores and ps is not None:
                yield from on_cores(int(h[i, p]))
            else:
                with res[r].request() as req:
                    yield req
                    if h[i, p]:
                        yield env.timeout(int(h[i, p]))
        elif r >= 0 and two[i]:
            # A pool held for the step; inside it, a core for the CPU part.
            with res[r].request() as req:
                yield req
                yield from on_cores(int(ch[i, p]))
                if h[i, p] - ch[i, p]:
                    yield env.timeout(int(h[i, p] - ch[i, p]))
            # No hop after the release: like a coroutine that keeps its event loop until its
            # next await, this pod goes on (and asks for its next limit) before the waiter it
            # handed the pool to resumes and asks for its core (the fast model's order too).
            if d[i, p] - h[i, p]:
                yield env.timeout(int(d[i, p] - h[i, p]))
        elif r >= 0 and r == cores and ps is not None:
            yield from on_cores(int(h[i, p]))
            if d[i, p] - h[i, p]:
                yield env.timeout(int(d[i, p] - h[i, p]))
        elif r >= 0:  # a queued pool or a recursion limit: the same order as above
            with res[r].request() as req:
                yield req
                if h[i, p]:
                    yield env.timeout(int(h[i, p]))
            if d[i, p] - h[i, p]:
                yield env.timeout(int(d[i, p] - h[i, p]))
        elif d[i, p]:
            yield env.timeout(int(d[i, p]))
        end[i, p] = env.now
        if off[i] > 0:
            # A process no step owns starts running: it takes its share of the cores while
            # the pod goes on without waiting for it.
            if ps is not None:
                ps.run(off[i])
            else:
                env.process(on_cores(off[i]))

    def pod(p: int) -> Iterator[simpy.Event]:
        submit[p] = env.now
        for i in range(k):
            yield env.process(step(p, i))

    if arrivals is None:
        nxt = [0]

        def worker() -> Iterator[simpy.Event]:
            while nxt[0] < pods:
                p = nxt[0]
                nxt[0] += 1
                yield from pod(p)

        for _ in range(max(1, int(concurrency or 1))):
            env.process(worker())
    else:
        def arrive(p: int, at: int) -> Iterator[simpy.Event]:
            if at > env.now:
                yield env.timeout(at - env.now)
            yield from pod(p)

        for p in range(pods):
            if arrivals[p] < INF:
                env.process(arrive(p, int(arrivals[p])))
    env.run()
    return NodeTimes(submit=submit, start=start, end=end)
