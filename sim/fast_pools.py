"""Owns: the fast node model for programs with two-limit steps (a pool held around a core).

sim.fast serves every limit as a FIFO multi-server queue whose holder's hold is known when it
is granted (Kiefer-Wolfowitz: grant = max(request, earliest free server)).  A two-limit step
breaks that for its pool: the holder keeps its worker while it waits for a core, so when the
pool is granted nobody knows yet when it will be free.  Such pools ("queued pools") are run
here as real queues — a count of busy workers and a FIFO of waiting pods per node — with the
release as an event; the cores (and any pool no two-limit step uses) keep the recursion.

A pod of a node is in one of three phases at its stage j (its j-th contended step):
0 asks for the stage's limit, 1 asks for a core (pool granted), 2 releases its queued pool.
Each iteration serves every node's earliest event, as sim.fast does.  When a release hands
the pool to a waiter, the releasing pod goes on first: if its next request falls at the same
instant (no free time in between), it is made before the waiter asks for its core.  That is
how an asyncio loop runs — the coroutine that finishes a piece of work keeps the loop until
its next await (right after engine.prepare the engine forks the shim, or sends the
sandboxer its Create, before another request's handler runs) — and the reference SimPy model
(sim.model) orders the two the same way.  A pool the releasing pod is granted at that instant
is taken at once, but like any holder it asks for its core only when it resumes.

Processor-shared cores (`sharing = "ps"`, sim.cores) run here too, since the end of a step on
them depends on who arrives later.  Per node: virtual time, its instant, the jobs in, the
smallest tag and the next departure; per pod its tag.  A stage on the cores alone is a
two-limit stage whose pool is never short.  A departure is a node event of its own, after
every pod event of its instant (the reference's order); the node's next pod event, if it comes
before the next departure, runs in the same iteration.  Arrivals at one instant commute, so a
node's several arrivals are taken in one call.
"""
from __future__ import annotations

import threading

import numpy as np

from sim.chains import Program
from sim.cores import advance, due
from sim.model import INF, NodeTimes, core_hold_ns, step_times

KW, POOL, POOL_CORE = 0, 1, 2  # stage kinds (a stage on processor-shared cores: POOL_CORE)
ASK, CORE, RELEASE = 0, 1, 2  # phases
CORE_WAIT = 3  # on processor-shared cores: no event of its own (the node's departure is one)


def simulate_queued(program: Program, d: np.ndarray, pre: np.ndarray, hold: np.ndarray, *,
                    closed: bool, c: int, arrivals: np.ndarray | None,
                    t0v: np.ndarray) -> NodeTimes:
    """Like sim.fast.simulate_nodes (same arguments after its set-up), for queued pools."""
    _, b, pods = d.shape
    lim = program.limited
    n_lim = len(lim)
    queued = program.queued_pools
    res_of = np.asarray([program.limit_index[k] for k in lim], dtype=np.int64)
    core = program.core_index
    ps = program.sharing == "ps" and core >= 0
    # A stage on processor-shared cores alone is run like a two-limit stage whose pool is
    # never short (ON_CORES): it asks for its core share at once and holds nothing else.
    on_cores = [ps and program.limit_index[k] == core for k in lim]
    kind = np.asarray([POOL_CORE if on_cores[j] else (
        (POOL_CORE if program.core_hold[k] > 0 else POOL)
        if program.limit_index[k] in queued else KW) for j, k in enumerate(lim)],
                      dtype=np.int64)
    bare = np.asarray(on_cores + [False], dtype=bool)  # per stage: no pool around the core part
    chold = np.zeros((n_lim,) + d.shape[1:], dtype=np.int64)
    for j, k in enumerate(lim):
        if on_cores[j]:
            chold[j] = hold[j]
        elif kind[j] == POOL_CORE:
            chold[j] = core_hold_ns(program, d, k)
    n_res = len(program.capacities)
    caps = np.asarray(program.capacities, dtype=np.int64)
    cmax = max(program.capacities)

    submit, t_next, counter = start_state(pre, t0v, closed, c, arrivals)
    seg = np.zeros((b, pods), dtype=np.int64)
    phase = np.zeros((b, pods), dtype=np.int64)

    # Per (pod, stage) its free time before the request, hold, CPU part and grant, side by side
    # (pod-major): an event touches one pod's stage and the next one's, and the pods of an
    # iteration lie all over the batch, so one cache line instead of four per access is what
    # this layout buys (the stage-major arrays cost a cache miss per field).
    S = n_lim + 1
    st = _scratch((b, pods, S, 4))
    st[:, :, :, 0] = np.moveaxis(pre, 0, -1)
    st[:, :, :n_lim, 1] = np.moveaxis(hold[:n_lim], 0, -1)
    st[:, :, :n_lim, 2] = np.moveaxis(chold, 0, -1)
    st[:, :, n_lim, 1:] = 0
    st_f = st.reshape(-1)
    t_f = t_next.reshape(-1)
    seg_f, ph_f = seg.reshape(-1), phase.reshape(-1)
    # Recursion state of the non-queued limits (cores among them): per server, when free.
    free = np.full((b, n_res, cmax), INF, dtype=np.int64)
    for r, cap in enumerate(program.capacities):
        free[:, r, :cap] = 0
    free_f = free.reshape(-1)
    ar_c = np.arange(cmax, dtype=np.int64)
    # Queued pools: busy workers and a ring of waiting pods per (node, pool).
    busy = np.zeros(b * n_res, dtype=np.int64)
    ring = np.zeros(b * n_res * pods, dtype=np.int64)
    head = np.zeros(b * n_res, dtype=np.int64)
    tail = np.zeros(b * n_res, dtype=np.int64)
    rows_all = np.arange(b, dtype=np.int64)
    row_base = rows_all * pods

    ar_rows = np.arange(b, dtype=np.int64)
    core_of = np.full(b, core, dtype=np.int64)
    # Processor sharing (sim.cores): per node virtual time, its instant, jobs in, smallest tag
    # and next departure; per pod its tag (inf: not on the cores).
    n_cores = program.capacities[core] if core >= 0 else 1
    ps_v = np.zeros(b, dtype=np.float64)
    ps_t = np.zeros(b, dtype=np.int64)  # V stands still while idle: any start will do
    ps_n = np.zeros(b, dtype=np.int64)
    ps_due = np.full(b, INF, dtype=np.int64)
    ps_min = np.full(b, np.inf, dtype=np.float64)  # smallest tag of the jobs in
    ps_arg = np.zeros(b, dtype=np.int64)  # a pod holding it
    tag = np.full((b, pods), np.inf, dtype=np.float64)
    tag_f = tag.reshape(-1)
    if not closed:
        # Open loop: the tail after the last hold needs no event; INF + an instant < 2**63.
        st[:, :, n_lim, 0] = INF

    def recursion(rows: np.ndarray, r: np.ndarray, t: np.ndarray,
                  h: np.ndarray) -> np.ndarray:
        """Grant instants for requests at t on non-queued limits r holding h; books them."""
        base = (rows * n_res + r) * cmax
        if cmax == 1:
            g = np.maximum(t, free_f[base])
            free_f[base] = g + h
            return g
        cand = free_f[base[:, None] + ar_c]
        s = cand.argmin(axis=1)
        g = np.maximum(t, cand[ar_rows[:rows.size], s])
        free_f[base + s] = g + h
        return g

    def ask_core(rows: np.ndarray, fp: np.ndarray, j: np.ndarray, t: np.ndarray) -> None:
        fj = (fp * S + j) * 4
        if not ps:
            g = recursion(rows, core_of[:rows.size], t, st_f[fj + 2])
            st_f[fj + 3] = g
            t_f[fp] = g + st_f[fj + 1]
            ph_f[fp] = RELEASE
            return
        w = st_f[fj + 2]
        zero = w == 0
        if zero.any():  # no CPU to share: on at once (the reference does not queue it either)
            core_done(fp[zero], j[zero], t[zero])
            live = ~zero
            rows, fp, t, w = rows[live], fp[live], t[live], w[live]
            if not rows.size:
                return
        # A node may arrive here more than once (all at its one current instant): every copy
        # reads the state before the arrivals, and with dt = 0 the later arrivals would not
        # move V, so the copies agree and the writes below are the same value.
        v = advance(ps_v[rows], t - ps_t[rows], ps_n[rows], n_cores)
        ps_v[rows], ps_t[rows] = v, t
        tg = v + w
        tag_f[fp] = tg
        t_f[fp] = INF
        ph_f[fp] = CORE_WAIT
        if rows.size > 1 and np.bincount(rows).max() > 1:
            np.add.at(ps_n, rows, 1)
            np.minimum.at(ps_min, rows, tg)
            hit = tg == ps_min[rows]  # any pod holding the smallest tag will do
            ps_arg[rows[hit]] = fp[hit] - rows[hit] * pods
        else:
            ps_n[rows] += 1
            low = tg < ps_min[rows]
            ps_min[rows[low]] = tg[low]
            ps_arg[rows[low]] = fp[low] - rows[low] * pods
        ps_due[rows] = due(t, v, ps_min[rows], ps_n[rows], n_cores)

    def core_done(fp: np.ndarray, j: np.ndarray, t: np.ndarray) -> None:
        """Pods whose CPU part of stage j ended at t: the rest of the pool's hold, or on."""
        fj = (fp * S + j) * 4
        ch = st_f[fj + 2]
        st_f[fj + 3] = t - ch
        b0 = bare[j]
        if b0.any():  # no pool to release: on to the next request
            move_on(fp[b0], j[b0], t[b0])
            held = ~b0
            fp, fj, t, ch = fp[held], fj[held], t[held], ch[held]
        t_f[fp] = t + (st_f[fj + 1] - ch)
        ph_f[fp] = RELEASE

    def depart(rows: np.ndarray) -> np.ndarray | None:
        """The cores' next departure of each node in rows (sim.cores.PSCores._fire)."""
        t = ps_due[rows]
        v = np.maximum(advance(ps_v[rows], t - ps_t[rows], ps_n[rows], n_cores), ps_min[rows])
        ps_v[rows], ps_t[rows] = v, t
        # Nearly always one job leaves (the smallest tag, whose pod is known); two only when
        # their tags lie within the rounding of one instant, so those are picked up in a
        # loop that rarely runs.  One gather of the node's tags finds the next smallest.
        k = np.arange(rows.size)
        first = ps_arg[rows]
        tag_f[rows * pods + first] = np.inf
        if rows.size * 3 > b:
            # most nodes leave at once: one contiguous pass beats gathering their rows
            a = tag.argmin(axis=1)[rows]
            mine = None
        else:
            mine = tag[rows]
            a = mine.argmin(axis=1)
        m = tag[rows, a]
        gone_r, gone_p = [k], [first]
        more = m <= v
        if mine is None and more.any():
            mine = tag[rows]
        while more.any():
            e = k[more]
            gone_r.append(e)
            gone_p.append(a[e])
            mine[e, a[e]] = np.inf
            tag_f[rows[e] * pods + a[e]] = np.inf
            a[e] = mine[e].argmin(axis=1)
            m[e] = mine[e, a[e]]
            more[e] = m[e] <= v[e]
        ps_arg[rows] = a
        gone_r_a = np.concatenate(gone_r) if len(gone_r) > 1 else k
        gone_p_a = np.concatenate(gone_p) if len(gone_p) > 1 else first
        rr = rows[gone_r_a]
        fp = rr * pods + gone_p_a
        nn = ps_n[rows] - np.bincount(gone_r_a, minlength=rows.size)
        ps_n[rows] = nn
        core_done(fp, seg_f[fp], t[gone_r_a])
        ps_min[rows] = m
        nxt = np.full(rows.size, INF, dtype=np.int64)
        busy_r = nn > 0
        if busy_r.any():
            nxt[busy_r] = due(t[busy_r], v[busy_r], m[busy_r], nn[busy_r], n_cores)
        ps_due[rows] = nxt
        return fp if gone_r_a.size == rows.size else None

    def move_on(fp: np.ndarray, j: np.ndarray, t_end: np.ndarray) -> None:
        """The pod's hold of stage j ended at t_end: on to its next request (or its end)."""
        j1 = j + 1
        t_f[fp] = t_end + st_f[(fp * S + j1) * 4]
        seg_f[fp] = j1
        ph_f[fp] = ASK

    def ask_now(rows: np.ndarray, fp: np.ndarray, j: np.ndarray, t: np.ndarray,
                later: list[tuple[np.ndarray, ...]]) -> None:
        """Pods (at most one per node) asking for the limit of their stage j at t, at once.

        A pool granted to a two-limit stage is taken at once, but its holder asks for the core
        only when it resumes: after a waiter already handed a pool at this instant (`later`
        keeps the order).
        """
        kw = kind[j] == KW
        if kw.any():
            rk, fk, jk, tk = rows[kw], fp[kw], j[kw], t[kw]
            fj = (fk * S + jk) * 4
            h = st_f[fj + 1]
            g = recursion(rk, res_of[jk], tk, h)
            st_f[fj + 3] = g
            move_on(fk, jk, g + h)
        pl = ~kw
        if not pl.any():
            return
        rp, fq, jp, tp = rows[pl], fp[pl], j[pl], t[pl]
        rq = res_of[jp]
        q = rp * n_res + rq
        # A bare stage on shared cores has no pool to wait for: always "granted".
        ok = bare[jp] | (busy[q] < caps[rq])
        busy[q[ok & ~bare[jp]]] += 1
        two = ok & (kind[jp] == POOL_CORE)
        if two.any():
            later.append((rp[two], fq[two], jp[two], tp[two]))
        one = ok & ~two
        if one.any():
            fo, to = fq[one], tp[one]
            fj = (fo * S + jp[one]) * 4
            st_f[fj + 3] = to
            t_f[fo] = to + st_f[fj + 1]
            ph_f[fo] = RELEASE
        wait = ~ok
        if wait.any():
            qw = q[wait]
            ring[qw * pods + tail[qw] % pods] = fq[wait] - rp[wait] * pods
            tail[qw] += 1
            t_f[fq[wait]] = INF

    # Event code = phase * 3 + stage kind: 0 ask (recursion), 1-2 ask a queued pool (without /
    # with a core), 5 ask the core, 7-8 release.  One sort per iteration groups the nodes.
    while True:
        idx = t_next.argmin(axis=1)
        rows = rows_all
        fp = row_base + idx
        t = t_f[fp]
        if ps:
            # A departure from the shared cores comes after every pod event of its instant
            # (the reference schedules it at a lower priority than any other event).
            dep = (ps_due < t) & (ps_due < INF)
            if dep.any():
                dr = rows[dep]
                left = depart(dr)
                # Such a node's next pod event runs in this same iteration when it comes
                # before the node's next departure: the order is the same as one event per
                # iteration, with far fewer iterations.  Only the pod that left has a new
                # event, so the next one is the earlier of it and the one found above (ties:
                # lowest pod, as argmin) — unless two left at once (rare): search again.
                if left is None:
                    i2 = t_next[dr].argmin(axis=1)
                    f2 = dr * pods + i2
                else:
                    f_old, t_old = fp[dep], t[dep]
                    t_new = t_f[left]
                    new = (t_new < t_old) | ((t_new == t_old) & (left < f_old))
                    f2 = np.where(new, left, f_old)
                    i2 = f2 - dr * pods
                t2 = t_f[f2]
                idx[dep], fp[dep], t[dep] = i2, f2, t2
                again = np.zeros(b, dtype=bool)
                again[dep] = (ps_due[dr] < t2) & (ps_due[dr] < INF)
                if again.any():
                    keep = ~again
                    rows, idx, fp, t = rows[keep], idx[keep], fp[keep], t[keep]
                    if rows.size == 0:
                        continue
        if t.max() >= INF:
            act = t < INF
            if not act.any():
                if ps and (ps_due < INF).any():
                    continue  # only departures left (in nodes set aside above)
                break
            rows, idx, fp, t = rows[act], idx[act], fp[act], t[act]
        j = seg_f[fp]
        if closed:
            is_req = j < n_lim
            if not is_req.all():
                finish_pods(~is_req, rows, idx, t, t_next, submit, seg, pre, counter, pods,
                            phase)
                rows, idx, fp, t, j = rows[is_req], idx[is_req], fp[is_req], t[is_req], j[is_req]
                if rows.size == 0:
                    continue
        code = ph_f[fp] * 3 + kind[j]
        cnt = np.bincount(code, minlength=9).tolist()
        if cnt[0] == rows.size:  # only recursion asks: the common case, no sort
            fj = (fp * S + j) * 4
            h = st_f[fj + 1]
            g = recursion(rows, res_of[j], t, h)
            st_f[fj + 3] = g
            move_on(fp, j, g + h)
            continue
        order = code.argsort(kind="stable")
        rows, idx, fp, t, j = rows[order], idx[order], fp[order], t[order], j[order]
        b2 = cnt[0] + cnt[1] + cnt[2]
        c0 = b2 + cnt[3] + cnt[4]
        c1 = c0 + cnt[5]
        r0 = c1 + cnt[6]
        r1 = r0 + cnt[7]
        r2 = r1 + cnt[8]
        core_rows: list[tuple[np.ndarray, ...]] = []

        if b2:  # asks: recursion first, then pools (the order ask_now keeps too)
            ask_now(rows[:b2], fp[:b2], j[:b2], t[:b2], core_rows)

        if r2 > r0:
            rr, ff, jj, tt = rows[r0:r2], fp[r0:r2], j[r0:r2], t[r0:r2]
            q = rr * n_res + res_of[jj]
            has = head[q] < tail[q]
            busy[q[~has]] -= 1
            handed: tuple[np.ndarray, ...] | None = None
            if has.any():
                qh = q[has]
                w = ring[qh * pods + head[qh] % pods]
                head[qh] += 1
                wr, wt = rr[has], tt[has]
                wf = wr * pods + w
                wj = seg_f[wf]
                two = kind[wj] == POOL_CORE
                if two.any():
                    handed = (wr[two], wf[two], wj[two], wt[two])
                one = ~two
                if one.any():
                    fj = (wf[one] * S + wj[one]) * 4
                    st_f[fj + 3] = wt[one]
                    t_f[wf[one]] = wt[one] + st_f[fj + 1]
                    ph_f[wf[one]] = RELEASE
            move_on(ff, jj, tt)
            # The releasing pod goes on first: a next request at this same instant is made
            # before the waiter it handed the pool to asks for its core (core_rows are served
            # after this).
            if handed is not None:
                core_rows.append(handed)
            now = (t_f[ff] == tt) & (seg_f[ff] < n_lim)
            if now.any():
                ask_now(rr[now], ff[now], seg_f[ff[now]], tt[now], core_rows)

        if c1 > c0:
            core_rows.append((rows[c0:c1], fp[c0:c1], j[c0:c1], t[c0:c1]))
        if ps and len(core_rows) > 1:
            # Arrivals on shared cores at one instant commute (sim.cores), so one call takes
            # them all, a node's several arrivals included.
            ask_core(*(np.concatenate(x) for x in zip(*core_rows)))
        else:
            for rr, ff, jj, tt in core_rows:
                ask_core(rr, ff, jj, tt)
    grant = np.ascontiguousarray(np.moveaxis(st[:, :, :n_lim, 3], -1, 0))
    return step_times(program, d, submit, grant)


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """An int64 work array of `shape`, reusing one buffer per thread: a cluster runs batch
    after batch of one size, and first-touch page faults of a fresh 40 MB array cost more on
    this VM than filling it (~0.1 s a batch).  Per thread, because a Dask worker runs several
    simulations at once in one process.  Its contents are garbage: the caller fills it."""
    n = int(np.prod(shape))
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        buf = _SCRATCH.buf = np.empty(n, dtype=np.int64)
    return buf[:n].reshape(shape)


def start_state(pre: np.ndarray, t0v: np.ndarray, closed: bool, c: int,
                arrivals: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(submit, t_next, counter) at the start: closed loop, the first `c` pods of each node at
    its t0; open loop, every pod at its arrival (INF: never).  t_next is each submitted pod's
    first request (pre[0] after its submission)."""
    b, pods = pre.shape[1:]
    submit = np.full((b, pods), INF, dtype=np.int64)
    t_next = np.full((b, pods), INF, dtype=np.int64)
    if closed:
        submit[:, :c] = t0v[:, None]
        t_next[:, :c] = t0v[:, None] + pre[0, :, :c]
        return submit, t_next, np.full(b, c, dtype=np.int64)
    arr = np.asarray(arrivals, dtype=np.int64)
    live = arr < INF
    submit[live] = arr[live]
    t_next[live] = arr[live] + pre[0][live]
    return submit, t_next, np.zeros(b, dtype=np.int64)


def finish_pods(dn: np.ndarray, rows: np.ndarray, idx: np.ndarray, t: np.ndarray,
                t_next: np.ndarray, submit: np.ndarray, seg: np.ndarray, pre: np.ndarray,
                counter: np.ndarray, pods: int, phase: np.ndarray | None = None) -> None:
    """A pod finished (closed loop): its worker submits the node's next pod at that instant."""
    r, p, tt = rows[dn], idx[dn], t[dn]
    t_next[r, p] = INF
    k = counter[r]
    more = k < pods
    r, k, tt = r[more], k[more], tt[more]
    if r.size:
        submit[r, k] = tt
        t_next[r, k] = tt + pre[0, r, k]
        seg[r, k] = 0
        if phase is not None:
            phase[r, k] = ASK
        counter[r] += 1
