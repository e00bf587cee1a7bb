"""Owns: the fast node model — a program's contended stages, and many nodes run through the
compiled event loop (sim.fast_jit).

Why not SimPy here: SimPy costs ~2.8 µs per event on this machine, and a pod crosses 10-15
contended steps (twice that in events with shared cores), so any SimPy design tops out near
40-60k pods/s.  This module computes the same thing without an event object per step:

* Only contended steps are events.  Between two of them a pod's path is fixed, so the run of
  free steps (and the free tail of the previous step) is one integer addition — exact, because
  time is integer ns.  `_segments` folds them.
* A FIFO pool whose holder's hold time is known when it asks is a multi-server FIFO queue:
  a request is granted at max(now, earliest free server) and that server is busy until
  grant + hold (the Kiefer-Wolfowitz recursion) — exactly what `simpy.Resource` grants, so no
  wait queue is kept.  A pool held by a two-limit step (its holder keeps its worker while it
  waits for a core, so nobody knows when it is free) is a real queue: busy workers, waiting
  pods, the release an event.  Processor-shared cores (sim.cores) keep per node virtual time
  and the jobs in, and a departure is an event.  `stage_kinds` says which stage is which.
* Nodes never interact once pods are placed, so the kernel runs node after node.

Pods with equal instants are served lowest pod first; the reference SimPy model serves them in
event-creation order.  With continuous latencies such ties have probability ~0; the equality
tests (tests/test_sim_fast.py, tests/test_sim_ps.py) compare both models on one realisation.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from sim.chains import Program
from sim.fast_jit import KW, OFF, POOL, POOL_CORE, run_nodes
from sim.model import INF, NodeTimes, core_hold_ns, hold_ns, step_times


def _segments(program: Program, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pre, hold) per stage (Program.stages), stage-major.

    pre[j]: free time from the end of stage j-1's hold to stage j (pre[S]: the tail);
    hold[j]: how long stage j holds its limit (0 for an off-path start).
    """
    stages = program.stages
    n_st = len(stages)
    shape = d.shape[1:]
    pre = np.zeros((n_st + 1,) + shape, dtype=np.int64)
    hold = np.zeros((max(n_st, 1),) + shape, dtype=np.int64)
    j = 0
    first = program.free_first
    for k in range(d.shape[0]):
        if j < n_st and stages[j] == (k, False):
            hold[j] = hold_ns(program, d, k)
            # the free part of a contended step is free time before its own request
            # (wait-first) or before the next stage
            w = j if first[k] else j + 1
            np.add(pre[w], d[k], out=pre[w])
            np.subtract(pre[w], hold[j], out=pre[w])
            j += 1
        else:
            np.add(pre[j], d[k], out=pre[j])
        if j < n_st and stages[j] == (k, True):
            j += 1  # the off-path job starts when the step ends: nothing held
    return pre, hold


def stage_kinds(program: Program, d: np.ndarray, hold: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per stage: its kind (KW: recursion; POOL: a queued pool; POOL_CORE: a queued pool and
    a core inside it; OFF: an off-path job starts), whether it is bare (on shared cores with
    no pool around them; one more False for the tail), the limit it asks for (OFF: its slot
    among the pod's off-path jobs), and its CPU part (ns; OFF: the job's work)."""
    stages = program.stages
    queued = program.queued_pools
    ps, core = program.shares_cores, program.core_index
    # A stage on processor-shared cores alone is run like a two-limit stage whose pool is
    # never short: it asks for its core share at once and holds nothing else.
    on_cores = [ps and not off and program.limit_index[k] == core for k, off in stages]
    kind = np.empty(len(stages), dtype=np.int64)
    res_of = np.empty(len(stages), dtype=np.int64)
    chold = np.zeros((max(len(stages), 1),) + d.shape[1:], dtype=np.int64)
    n_off = 0
    for j, (k, off) in enumerate(stages):
        r = program.limit_index[k]
        if off:
            kind[j], res_of[j] = OFF, n_off
            chold[j] = program.offpath[k]
            n_off += 1
            continue
        kind[j] = POOL_CORE if on_cores[j] else (
            (POOL_CORE if program.core_hold[k] > 0 else POOL) if r in queued else KW)
        res_of[j] = r
        if on_cores[j]:
            chold[j] = hold[j]
        elif kind[j] == POOL_CORE:
            chold[j] = core_hold_ns(program, d, k)
    bare = np.asarray(on_cores + [False], dtype=np.bool_)
    return kind, bare, res_of, chold


def start_state(pre: np.ndarray, t0v: np.ndarray, closed: bool, c: int,
                arrivals: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(submit, t_next, submitted per node) at the start: closed loop, the first `c` pods of
    each node at its t0; open loop, every pod at its arrival (INF: never).  t_next is each
    submitted pod's first request (pre[0] after its submission)."""
    b, pods = pre.shape[1:]
    submit = np.full((b, pods), INF, dtype=np.int64)
    t_next = np.full((b, pods), INF, dtype=np.int64)
    if closed:
        submit[:, :c] = t0v[:, None]
        t_next[:, :c] = t0v[:, None] + pre[0, :, :c]
        return submit, t_next, c
    arr = np.asarray(arrivals, dtype=np.int64)
    live = arr < INF
    submit[live] = arr[live]
    t_next[live] = arr[live] + pre[0][live]
    return submit, t_next, 0


def simulate_nodes(program: Program, d: np.ndarray, *, concurrency: int | None = None,
                   arrivals: np.ndarray | None = None,
                   t0: np.ndarray | int = 0) -> NodeTimes:
    """Simulate B nodes.  d: (steps, B, pods) ns; arrivals: (B, pods) ns or None.

    Closed loop when `arrivals` is None: `concurrency` workers per node, all starting at t0
    (per node), each taking the next pod when its previous one is done.
    """
    _, b, pods = d.shape
    stages = program.stages
    n_st = len(stages)
    pre, hold = _segments(program, d)
    t0v = np.broadcast_to(np.asarray(t0, dtype=np.int64), (b,)).copy()
    closed = arrivals is None
    c = max(1, min(int(concurrency or 1), pods))
    if closed and c >= pods:
        # Every pod has its own worker: nobody waits for a pod to finish, i.e. open loop.
        closed = False
        arrivals = np.repeat(t0v[:, None], pods, axis=1)
    submit, t_next, counter = start_state(pre, t0v, closed, c, arrivals)
    # Every submitted pod passes every stage, so each grant it needs gets written; np.empty
    # spares first-touch page faults, which are costly on this VM.
    grant = np.empty((max(n_st, 1), b, pods), dtype=np.int64)
    if (n_st or closed) and b and pods:  # (open loop with nothing contended: no events)
        kind, bare, res_of, chold = stage_kinds(program, d, hold)
        caps = np.asarray(program.capacities or (1,), dtype=np.int64)
        core, ps = program.core_index, program.shares_cores
        run_nodes(kind, bare, res_of, caps, int(caps.max()), core, int(caps[core]) if ps else 1,
                  ps, program.ps_limit if ps else 0, closed, n_st, int((kind == OFF).sum()),
                  counter, pre, hold, chold, submit, t_next, grant)
    if n_st != len(program.limited):  # step_times wants the grants of the limits only
        grant = grant[[j for j, (_, off) in enumerate(stages) if not off]]
    return step_times(program, d, submit, grant)


def ensure_compiled(say: Callable[[str], None] | None = None, after_s: float = 1.5) -> None:
    """Load the event loop into this process (numba's cache, or a compile of ~10 s when the
    cache is cold); if that takes longer than `after_s`, tell `say` why the run waits."""
    from sim import fast_jit

    if fast_jit.run_nodes.signatures:
        return
    done = threading.Event()

    def note() -> None:
        if not done.is_set() and say is not None:
            say("simulate: compiling the event loop (once, ~10 s; `make setup` does it ahead)")

    timer = threading.Timer(after_s, note)
    timer.daemon = True
    timer.start()
    try:
        warm()
    finally:
        done.set()
        timer.cancel()


def warm() -> float:
    """Compile the event loop (or load it from numba's cache); seconds taken."""
    import time

    from sim.calibration import prior_calibration
    from sim.chains import build_program, start_sequence
    from sim.model import draw_nodes

    t = time.perf_counter()
    model = prior_calibration().model("shim", "runc", "restore")
    node = {"cores": 2, "engine_workers": 1, "sandboxer_workers": 1, "vmm_boots": 1}
    prog = build_program(model, start_sequence(1), node, 2, sharing="ps")
    d = draw_nodes(prog, seed=0, chain="shim", flavor="runc", phase=0, lo=0, hi=1, pods=3)
    simulate_nodes(prog, d, concurrency=2)
    return time.perf_counter() - t


if __name__ == "__main__":
    print(f"sim.fast: event loop ready ({warm():.1f} s)")
