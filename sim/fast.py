"""Owns: the fast node model — many identical-configuration nodes advanced in lockstep.

Why not SimPy here: SimPy costs ~2.8 µs per event on this machine (~350k events/s measured),
and a pod crosses 5-10 contended steps, so any SimPy design — even one process per pod with
free steps folded into one timeout — tops out near 40-60k pods/s.  This module computes the
same thing without an event object per step:

* Only contended steps are events.  Between two of them a pod's path is fixed, so the run of
  free steps (and the waiting tail of the previous step) is one integer addition — exact,
  because time is integer ns.
* A FIFO pool whose holder's hold time is known when it asks is a multi-server FIFO queue:
  processed in request-time order, a request is granted at max(now, earliest free server) and
  that server is busy until grant + hold (the Kiefer-Wolfowitz recursion).  That is exactly what
  `simpy.Resource` grants, so no wait queue has to be kept.
* Nodes are independent (placement happens before a node runs), and nodes of one configuration
  run the same program, so a batch of B nodes is advanced together: each iteration takes every
  node's earliest pending request (argmin over its pods) and serves it — one numpy pass per
  event *rank* instead of one Python step per event.

Programs with two-limit steps (a pool held while its holder waits for a core) run their
pools as real queues in sim.fast_pools.

Pods with equal instants are served lowest pod first; the reference SimPy model serves them in
event-creation order.  With continuous latencies such ties have probability ~0; the equality
test (tests/test_sim_fast.py) compares both models on the same realisation.
"""
from __future__ import annotations

import numpy as np

from sim.chains import Program
from sim.fast_pools import finish_pods, simulate_queued, start_state
from sim.model import INF, NodeTimes, hold_ns, step_times


def _segments(program: Program, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pre, hold) for the contended steps, step-major.

    pre[j]: free time from the end of contended hold j-1 to request j (pre[L]: the tail);
    hold[j]: how long contended step j holds its limit.
    """
    lim = program.limited
    n_lim = len(lim)
    shape = d.shape[1:]
    pre = np.zeros((n_lim + 1,) + shape, dtype=np.int64)
    hold = np.empty((max(n_lim, 1),) + shape, dtype=np.int64)
    j = 0
    first = program.free_first
    for k in range(d.shape[0]):
        if j < n_lim and lim[j] == k:
            hold[j] = hold_ns(program, d, k)
            # the free part of a contended step is free time before its own request
            # (wait-first) or before the next one
            w = j if first[k] else j + 1
            np.add(pre[w], d[k], out=pre[w])
            np.subtract(pre[w], hold[j], out=pre[w])
            j += 1
        else:
            np.add(pre[j], d[k], out=pre[j])
    return pre, hold


def simulate_nodes(program: Program, d: np.ndarray, *, concurrency: int | None = None,
                   arrivals: np.ndarray | None = None,
                   t0: np.ndarray | int = 0) -> NodeTimes:
    """Simulate B nodes at once.  d: (steps, B, pods) ns; arrivals: (B, pods) ns or None.

    Closed loop when `arrivals` is None: `concurrency` workers per node, all starting at t0
    (per node), each taking the next pod when its previous one is done.
    """
    _, b, pods = d.shape
    lim = program.limited
    n_lim = len(lim)
    pre, hold = _segments(program, d)
    t0v = np.broadcast_to(np.asarray(t0, dtype=np.int64), (b,)).copy()
    closed = arrivals is None
    c = max(1, min(int(concurrency or 1), pods))
    if closed and c >= pods:
        # Every pod has its own worker: nobody waits for a pod to finish, i.e. open loop.
        closed = False
        arrivals = np.repeat(t0v[:, None], pods, axis=1)
    if program.queued_pools or (program.sharing == "ps" and program.core_index >= 0):
        return simulate_queued(program, d, pre, hold, closed=closed, c=c, arrivals=arrivals,
                               t0v=t0v)
    submit, t_next, counter = start_state(pre, t0v, closed, c, arrivals)
    # Every submitted pod passes every contended step, so each grant it needs gets written;
    # np.empty spares first-touch page faults, which are costly on this VM.
    grant = np.empty((max(n_lim, 1), b, pods), dtype=np.int64)
    if n_lim == 0 and not closed:
        return step_times(program, d, submit, grant)
    seg = np.zeros((b, pods), dtype=np.int64)

    # Flat views: one integer index per (segment, node, pod) is cheaper than tuple indexing.
    bp = b * pods
    hold_f = hold.reshape(-1)
    pre_f = pre.reshape(-1)
    grant_f = grant.reshape(-1)
    t_f = t_next.reshape(-1)
    seg_f = seg.reshape(-1)
    res_of = np.asarray([program.limit_index[k] for k in lim] or [0], dtype=np.int64)
    n_res = max(len(program.capacities), 1)
    cmax = max(program.capacities, default=1)
    free = np.full((b, n_res, cmax), INF, dtype=np.int64)
    for r, cap in enumerate(program.capacities):
        free[:, r, :cap] = 0
    free_f = free.reshape(-1)
    ar_c = np.arange(cmax, dtype=np.int64)
    rows_all = np.arange(b, dtype=np.int64)
    row_base = rows_all * pods
    row_res = rows_all * n_res

    while True:
        idx = t_next.argmin(axis=1)
        rows = rows_all
        fp = row_base + idx  # flat (node, pod)
        t = t_f[fp]
        if t.max() >= INF:
            act = t < INF
            if not act.any():
                break
            rows, idx, fp, t = rows[act], idx[act], fp[act], t[act]
        j = seg_f[fp]
        if closed:
            is_req = j < n_lim
            if not is_req.all():
                finish_pods(~is_req, rows, idx, t, t_next, submit, seg, pre, counter, pods)
                rows, idx, fp, t, j = rows[is_req], idx[is_req], fp[is_req], t[is_req], j[is_req]
                if rows.size == 0:
                    continue
        base = (row_res[rows] + res_of[j]) * cmax
        if cmax == 1:
            slot = base
            f = free_f[slot]
        else:
            cand = free_f[base[:, None] + ar_c]
            s = cand.argmin(axis=1)
            slot = base + s
            f = cand[np.arange(rows.size), s]
        g = np.maximum(t, f)
        fj = j * bp + fp
        e = g + hold_f[fj]
        free_f[slot] = e
        grant_f[fj] = g
        nxt = e + pre_f[fj + bp]
        j += 1
        if not closed:
            # Open loop: nobody waits for a pod to finish, so its tail needs no event.
            nxt[j == n_lim] = INF
        t_f[fp] = nxt
        seg_f[fp] = j
    return step_times(program, d, submit, grant)
