"""Owns: the fast model's event loop — one node at a time, one event at a time, compiled.

Its inputs are sim.fast's (free time before each contended stage, holds, CPU parts, stage
kinds).  It was first written as numpy passes over a batch of nodes in lockstep (one array
pass per event *rank*), which topped out near 60-90k pods/s here: each rank cost tens of numpy
calls, and shared cores make a departure an event of its own.  Compiled with numba and run
node after node, an event is a few scalar operations (two tournament trees over the node's
pods find its next event and its next departure), ~100 ns.

Same model, same order, same bits as the reference SimPy model (sim.model).  Per node it
serves the earliest pod event, lowest pod first on ties; a departure from the shared cores
comes after every pod event of its instant; a release that hands its pool on lets the
releasing pod make its next request first; arrivals on the shared cores at one instant are
taken one after another (they commute: with dt = 0 a later arrival does not move virtual
time).  An off-path job (Step.offpath) is a job on the shared cores that no pod waits for.
The virtual-time arithmetic is sim.cores' (`advance`, `due`) written out for scalars with
the same operation order, so departures land on the same ns.  tests/test_sim_fast.py and tests/test_sim_ps.py check equality with the reference.

Compiling takes ~10 s; numba caches the machine code next to this file (`make setup` warms
the cache, so runs and tests start at once).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from sim.model import INF

KW, POOL, POOL_CORE, OFF = 0, 1, 2, 3  # stage kinds (sim.fast.stage_kinds)
# A pod's phase at its current stage: it will ask for the stage's limit, it holds its pool and
# will release it, or it is on the shared cores (no event of its own: the departure is one).
ASK, RELEASE, CORE_WAIT = 0, 2, 3
_INF = int(INF)


@numba.njit(cache=True)
def _recursion(free: np.ndarray, r: int, cmax: int, t: int, h: int) -> int:
    """Grant instant of a request at t on non-queued limit r holding h (Kiefer-Wolfowitz)."""
    s = 0
    if cmax > 1:
        best = free[r, 0]
        for k in range(1, cmax):
            if free[r, k] < best:
                best = free[r, k]
                s = k
    f = free[r, s]
    g = t if t > f else f
    free[r, s] = g + h
    return g


@numba.njit(cache=True)
def _put(val: np.ndarray, tree: np.ndarray, i: int, x) -> None:
    """val[i] = x, and the tournament tree over val follows.

    tree[1] is the index of the smallest value, the lowest index among equal ones (what
    np.argmin returns, so the order is the lockstep loops'): node k holds the winner of its
    children 2k and 2k + 1, and a left child's indices are all below its right sibling's.
    Leaves are tree[P + i] = i.  An event costs log2(P) compares instead of a scan of the
    node's pods, which is what the 100-pod nodes of cluster-1m need."""
    val[i] = x
    p = tree.size >> 1
    k = (i + p) >> 1
    while k >= 1:
        a = tree[2 * k]
        b = tree[2 * k + 1]
        # branch-free: which child wins is a coin toss to the branch predictor, and a
        # mispredicted branch per level cost more than walking every level to the root
        tree[k] = a + (b - a) * (val[b] < val[a])
        k >>= 1


@numba.njit(cache=True)
def _build(val: np.ndarray, tree: np.ndarray) -> None:
    p = tree.size >> 1
    for i in range(p):
        tree[p + i] = i
    for k in range(p - 1, 0, -1):
        a = tree[2 * k]
        b = tree[2 * k + 1]
        tree[k] = a if val[a] <= val[b] else b


@numba.njit(cache=True)
def _move_on(i: int, j: int, t_end: int, node: int, n_lim: int, closed: bool,
             pre: np.ndarray, tn: np.ndarray, tt: np.ndarray, seg: np.ndarray,
             phase: np.ndarray) -> None:
    j1 = j + 1
    if j1 == n_lim and not closed:
        _put(tn, tt, i, _INF)  # open loop: nobody waits for a pod to finish: no tail event
    else:
        _put(tn, tt, i, t_end + pre[j1, node, i])
    seg[i] = j1
    phase[i] = ASK


@numba.njit(cache=True)
def _core_done(i: int, j: int, t: int, node: int, n_lim: int, closed: bool, bare: np.ndarray,
               pre: np.ndarray, hold: np.ndarray, chold: np.ndarray, grant: np.ndarray,
               tn: np.ndarray, tt: np.ndarray, seg: np.ndarray, phase: np.ndarray) -> None:
    """The CPU part of pod i's stage j ended at t: the rest of its pool's hold, or on."""
    ch = chold[j, node, i]
    grant[j, node, i] = t - ch
    if bare[j]:
        _move_on(i, j, t, node, n_lim, closed, pre, tn, tt, seg, phase)
    else:
        _put(tn, tt, i, t + (hold[j, node, i] - ch))
        phase[i] = RELEASE


@numba.njit(cache=True)
def _arrive(tag: np.ndarray, gt: np.ndarray, job: int, work: int, t: int, ps_v: float,
            ps_t: int, ps_n: int, n_cores: int) -> tuple[float, int, float, int]:
    """A job of `work` ns joins the shared cores at t: (V, jobs in, smallest tag, next
    departure) after it (sim.cores.advance and due, in the reference's operation order)."""
    v = ps_v + ((t - ps_t) * n_cores * (ps_n > 0)) / max(ps_n, n_cores)
    _put(tag, gt, job, v + work)
    n = ps_n + 1
    m = tag[gt[1]]
    gap = m - v if m > v else 0.0
    return v, n, m, t + np.int64(math.ceil(gap * max(n, n_cores) / n_cores))


@numba.njit(cache=True, inline="always")  # as a call, the loop ran ~10% slower (A/B)
def _pool_granted(i: int, j: int, t: int, node: int, kind: np.ndarray, hold: np.ndarray,
                  grant: np.ndarray, tn: np.ndarray, tt: np.ndarray, phase: np.ndarray,
                  stk_i: np.ndarray, stk_j: np.ndarray, ns: int) -> int:
    """Pod i got stage j's queued pool at t: a two-limit stage queues its core ask on the
    event's stack (asked after the event's own request, in stack order), a pool-only stage
    holds the pool for its hold.  Returns the stack's new size."""
    if kind[j] == POOL_CORE:
        stk_i[ns] = i
        stk_j[ns] = j
        return ns + 1
    grant[j, node, i] = t
    _put(tn, tt, i, t + hold[j, node, i])
    phase[i] = RELEASE
    return ns


@numba.njit(cache=True, nogil=True)  # a Dask worker's threads then simulate side by side
def run_nodes(kind: np.ndarray, bare: np.ndarray, res_of: np.ndarray, caps: np.ndarray,
              cmax: int, core: int, n_cores: int, ps: bool, ps_lim: int, closed: bool,
              n_lim: int, n_off: int, counter0: int, pre: np.ndarray, hold: np.ndarray,
              chold: np.ndarray, submit: np.ndarray, t_next: np.ndarray,
              grant: np.ndarray) -> None:
    """Every node of the batch, one after another; writes submit (closed loop) and grant.

    ps_lim > 0: at most that many jobs share the cores; a later one waits in arrival order
    (ring wq) without moving virtual time, and a departure lets the waiting in, each with
    its whole work, before the next departure is computed (sim.cores.PSCores's `limit`).

    n_lim: stages per pod; n_off: of them, off-path starts (OFF), each a job of its own on
    the shared cores: pod i's m-th is job (m + 1) * pods + i, the pod's own CPU is job i.
    counter0: pods already submitted per node (closed loop: its first `concurrency`).  cmax,
    n_cores, n_lim and n_off could be derived here from caps and kind, but passed in as
    plain integers the loop runs 10-15% faster (measured A/B, cluster-1m's 100-pod nodes)."""
    b, pods = t_next.shape
    n_res = caps.size
    free = np.empty((n_res, cmax), dtype=np.int64)
    busy = np.empty(n_res, dtype=np.int64)
    head = np.empty(n_res, dtype=np.int64)
    tail = np.empty(n_res, dtype=np.int64)
    ring = np.empty((n_res, pods), dtype=np.int64)
    seg = np.empty(pods, dtype=np.int64)
    phase = np.empty(pods, dtype=np.int64)
    size = 1
    while size < pods:
        size *= 2
    # Per pod its next event instant and its tag on the shared cores, padded to a power of
    # two with values never chosen (INF + 1 ties no real pod; inf tags never leave).
    tn = np.empty(size, dtype=np.int64)
    tt = np.empty(2 * size, dtype=np.int64)
    jobs = 1
    while jobs < pods * (1 + n_off):
        jobs *= 2
    tag = np.empty(jobs, dtype=np.float64)
    gt = np.empty(2 * jobs, dtype=np.int64)
    gone = np.empty(jobs, dtype=np.int64)
    wq_job = np.empty(jobs, dtype=np.int64)
    wq_work = np.empty(jobs, dtype=np.int64)
    # Core asks of one event, in the order they are made (a handed-over waiter first, then
    # the releasing pod's own next request): at most two.
    stk_i = np.empty(4, dtype=np.int64)
    stk_j = np.empty(4, dtype=np.int64)
    inf = np.inf
    for node in range(b):
        for r in range(n_res):
            for k in range(cmax):
                free[r, k] = 0 if k < caps[r] else _INF
            busy[r] = 0
            head[r] = 0
            tail[r] = 0
        seg[:] = 0
        phase[:] = ASK
        tag[:] = inf
        tn[:pods] = t_next[node]
        tn[pods:] = _INF + 1
        _build(tn, tt)
        _build(tag, gt)
        counter = counter0
        # Processor-shared cores (sim.cores): virtual time, its instant, jobs in, next
        # departure and the smallest tag (a pod holding it: gt[1]).
        ps_v = 0.0
        ps_t = 0
        ps_n = 0
        ps_due = _INF
        ps_min = inf
        wq_head = 0
        wq_tail = 0
        while True:
            i = tt[1]
            t = tn[i]
            if ps and ps_due < _INF and ps_due < t:
                # A departure comes after every pod event of its instant.
                td = ps_due
                # sim.cores.advance, then the clamp of PSCores._fire
                v = ps_v + ((td - ps_t) * n_cores * (ps_n > 0)) / max(ps_n, n_cores)
                if ps_min > v:
                    v = ps_min
                ps_v = v
                ps_t = td
                a = gt[1]
                gone[0] = a
                ng = 1
                _put(tag, gt, a, inf)
                a = gt[1]
                m = tag[a]
                while m <= v:  # tags within the rounding of one instant leave together
                    gone[ng] = a
                    ng += 1
                    _put(tag, gt, a, inf)
                    a = gt[1]
                    m = tag[a]
                ps_n -= ng
                if wq_head < wq_tail and ps_n < ps_lim:
                    while wq_head < wq_tail and ps_n < ps_lim:
                        a = wq_head % jobs
                        _put(tag, gt, wq_job[a], v + wq_work[a])
                        wq_head += 1
                        ps_n += 1
                    m = tag[gt[1]]
                for k in range(ng):
                    g = gone[k]
                    if g >= pods:
                        continue  # an off-path job: nobody waits for it
                    _core_done(g, seg[g], td, node, n_lim, closed, bare, pre, hold, chold,
                               grant, tn, tt, seg, phase)
                ps_min = m
                if ps_n > 0:
                    gap = m - v if m > v else 0.0
                    ps_due = td + np.int64(math.ceil(gap * max(ps_n, n_cores) / n_cores))
                else:
                    ps_due = _INF
                continue
            if t >= _INF:
                break
            j = seg[i]
            if closed and j >= n_lim:
                # A pod finished: its worker submits the node's next pod at that instant.
                _put(tn, tt, i, _INF)
                if counter < pods:
                    submit[node, counter] = t
                    _put(tn, tt, counter, t + pre[0, node, counter])
                    seg[counter] = 0
                    phase[counter] = ASK
                    counter += 1
                continue
            ns = 0
            # ask: the pod's own request (ASK), or the releasing pod's next one at this
            # same instant (after a RELEASE).
            ask = i if phase[i] == ASK else -1
            if phase[i] == RELEASE:
                q = res_of[j]
                if head[q] < tail[q]:
                    w = ring[q, head[q] % pods]
                    head[q] += 1
                    # handed over: its holder asks for its core when it resumes, after
                    # the releasing pod's own next request is made (below)
                    ns = _pool_granted(w, seg[w], t, node, kind, hold, grant, tn, tt, phase,
                                       stk_i, stk_j, ns)
                else:
                    busy[q] -= 1
                _move_on(i, j, t, node, n_lim, closed, pre, tn, tt, seg, phase)
                if tn[i] == t and seg[i] < n_lim:
                    ask = i
            if ask >= 0:
                ja = seg[ask]
                kd = kind[ja]
                if kd == OFF:
                    w0 = chold[ja, node, ask]
                    grant[ja, node, ask] = t
                    if not ps:
                        _recursion(free, core, cmax, t, w0)
                    elif w0 > 0 and ps_lim > 0 and ps_n >= ps_lim:
                        a = wq_tail % jobs
                        wq_job[a] = (res_of[ja] + 1) * pods + ask
                        wq_work[a] = w0
                        wq_tail += 1
                    elif w0 > 0:
                        ps_v, ps_n, ps_min, ps_due = _arrive(
                            tag, gt, (res_of[ja] + 1) * pods + ask, w0, t, ps_v, ps_t, ps_n,
                            n_cores)
                        ps_t = t
                    _move_on(ask, ja, t, node, n_lim, closed, pre, tn, tt, seg, phase)
                elif kd == KW:
                    h = hold[ja, node, ask]
                    g = _recursion(free, res_of[ja], cmax, t, h)
                    grant[ja, node, ask] = g
                    _move_on(ask, ja, g + h, node, n_lim, closed, pre, tn, tt, seg, phase)
                else:
                    q = res_of[ja]
                    if bare[ja] or busy[q] < caps[q]:
                        if not bare[ja]:
                            busy[q] += 1
                        ns = _pool_granted(ask, ja, t, node, kind, hold, grant, tn, tt, phase,
                                           stk_i, stk_j, ns)
                    else:
                        ring[q, tail[q] % pods] = ask
                        tail[q] += 1
                        _put(tn, tt, ask, _INF)
            for kk in range(ns):
                # With limited sharing the order of one instant's core asks decides who gets
                # in: on the shared cores the reference's releasing pod asks before the waiter
                # it handed its pool to, while FIFO cores take the waiter first (the stack's
                # order; checked: reversing it for FIFO breaks the equality tests); plain
                # sharing commutes.
                k = ns - 1 - kk if ps_lim > 0 else kk
                p = stk_i[k]
                jp = stk_j[k]
                w0 = chold[jp, node, p]
                if not ps:
                    g = _recursion(free, core, cmax, t, w0)
                    grant[jp, node, p] = g
                    _put(tn, tt, p, g + hold[jp, node, p])
                    phase[p] = RELEASE
                    continue
                if w0 == 0:  # no CPU to share: on at once (the reference does not queue it)
                    _core_done(p, jp, t, node, n_lim, closed, bare, pre, hold, chold, grant,
                               tn, tt, seg, phase)
                    continue
                if ps_lim > 0 and ps_n >= ps_lim:
                    a = wq_tail % jobs
                    wq_job[a] = p
                    wq_work[a] = w0
                    wq_tail += 1
                else:
                    ps_v, ps_n, ps_min, ps_due = _arrive(tag, gt, p, w0, t, ps_v, ps_t, ps_n,
                                                         n_cores)
                    ps_t = t
                _put(tn, tt, p, _INF)
                phase[p] = CORE_WAIT
