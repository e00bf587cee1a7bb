"""Processor-shared cores (sim.cores): the arithmetic, the reference server, and the fast model
equal to the reference bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import simpy

from sim.calibration import Calibration, CalibrationError, prior_calibration
from sim.chains import build_program, start_sequence, stop_sequence
from sim.cores import PSCores, advance, due
from sim.fast import simulate_nodes
from sim.model import INF, draw_nodes, simulate_node_naive
from sim.scenario_model import SettingsError, parse_settings
from test_sim_fast import _fast_equals_naive, _seeded_digest, _two_limit

CAL = prior_calibration()
MS = 1_000_000


def _serve(cores: int, jobs: list[tuple[int, int]], limit: int = 0) -> list[int]:
    """Departure instants of jobs (arrival ns, work ns) on the reference server (`limit`:
    at most that many share the cores)."""
    env = simpy.Environment()
    ps = PSCores(env, cores, limit)
    out = [0] * len(jobs)

    def job(i: int, at: int, work: int):
        yield env.timeout(at)
        yield ps.run(work)
        out[i] = int(env.now)

    for i, (at, work) in enumerate(jobs):
        env.process(job(i, at, work))
    env.run()
    return out


def test_two_jobs_share_one_core():
    # A alone for 5 ms (5 left), then both at half speed: A done at 15, B (5 left) at 20.
    assert _serve(1, [(0, 10 * MS), (5 * MS, 10 * MS)]) == [15 * MS, 20 * MS]


def test_no_slowdown_while_jobs_fit_on_the_cores():
    assert _serve(3, [(0, 7 * MS), (MS, 4 * MS), (2 * MS, 9 * MS)]) == [7 * MS, 5 * MS,
                                                                          11 * MS]


def test_n_equal_jobs_on_c_cores_take_n_over_c_times_longer():
    got = _serve(2, [(0, 6 * MS)] * 5)
    assert got == [15 * MS] * 5  # 5 jobs x 6 ms of CPU on 2 cores


def test_virtual_time_stands_still_while_idle():
    assert advance(12.5, 1000, 0, 2) == 12.5
    assert advance(np.array([12.5]), np.array([1000]), np.array([0]), 2)[0] == 12.5
    # a job arriving after an idle gap is served from scratch
    assert _serve(1, [(0, MS), (10 * MS, 2 * MS)]) == [MS, 12 * MS]


def test_scalar_and_array_arithmetic_give_the_same_bits():
    rng = np.random.default_rng(0)
    v = rng.random(2000) * 1e9
    dt = rng.integers(0, 10**9, 2000)
    n = rng.integers(0, 40, 2000)
    tag = v + rng.random(2000) * 1e8
    for c in (1, 2, 3, 8):
        arr = advance(v, dt, n, c)
        assert all(arr[i] == advance(float(v[i]), int(dt[i]), int(n[i]), c)
                   for i in range(0, 2000, 7))
        nn = np.maximum(n, 1)
        d_arr = due(dt, v, tag, nn, c)
        assert all(d_arr[i] == due(int(dt[i]), float(v[i]), float(tag[i]), int(nn[i]), c)
                   for i in range(0, 2000, 7))


def _accept_first(model):
    """cri.recv as the calibration's ACCEPT_RULE makes it: travel, then the engine loop."""
    from dataclasses import replace

    calls = {c: tuple(replace(s, limit="engine_workers", hold=0.4, cores=0.4, wait_first=True)
                      if s.step == "cri.recv" else s for s in steps)
             for c, steps in model.calls.items()}
    return replace(model, calls=calls)


def _ps_programs(chain, flavor, boot, calls, in_flight, node=None, two=False):
    model = CAL.model(chain, flavor, boot)
    if two:
        model = _accept_first(_two_limit(model))
    caps = node or CAL.node
    return (build_program(model, calls, caps, in_flight, prune=True, sharing="ps"),
            build_program(model, calls, caps, in_flight, prune=False, sharing="ps"))


@pytest.mark.parametrize("chain,flavor,boot", [
    ("shim", "runc", "restore"), ("sandbox", "runc", "restore"),
    ("shim", "microvm", "restore"), ("sandbox", "microvm", "cold"),
])
@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("conc,pods,containers,node", [
    (1, 10, 1, None), (10, 40, 1, None), (6, 24, 2, None), (40, 40, 1, None),
    (8, 30, 1, {"cores": 1, "engine_workers": 2, "sandboxer_workers": 2, "vmm_boots": 1}),
    (12, 36, 1, {"cores": 3, "engine_workers": 1, "sandboxer_workers": 3, "vmm_boots": 2}),
])
def test_ps_closed_loop_fast_equals_naive(chain, flavor, boot, two, conc, pods, containers,
                                          node):
    fast, naive = _ps_programs(chain, flavor, boot, start_sequence(containers),
                               min(conc, pods), node, two)
    d = draw_nodes(naive, seed=9, chain=chain, flavor=flavor, phase=0, lo=0, hi=3, pods=pods)
    got = _fast_equals_naive(fast, naive, d, concurrency=conc)
    assert (got.done < INF).all()
    if two:
        assert any(naive.wait_first)


def test_wait_first_step_ends_when_it_lets_go():
    """A wait-first step's free part comes before its limit; it ends at the release."""
    model = _accept_first(CAL.model("sandbox", "runc", "restore"))
    node = {"cores": 2, "engine_workers": 1, "sandboxer_workers": 1, "vmm_boots": 1}
    prog = build_program(model, start_sequence(1), node, 1, prune=False, sharing="ps")
    d = draw_nodes(prog, seed=3, chain="sandbox", flavor="runc", phase=0, lo=0, hi=1, pods=1)
    t = simulate_nodes(prog, d, concurrency=1)
    k = next(i for i, s in enumerate(prog.steps) if s.step == "cri.recv")
    # alone on the node: the step lasts its latency, as any step does
    assert t.end[k, 0, 0] - t.start[k, 0, 0] == d[k, 0, 0]
    ref = simulate_node_naive(prog, d[:, 0], concurrency=1)
    assert np.array_equal(ref.end, t.end[:, 0])


def test_ps_open_loop_and_stop_phase_equal_naive():
    node = {"cores": 2, "engine_workers": 1, "sandboxer_workers": 1, "vmm_boots": 1}
    for two in (False, True):
        fast, naive = _ps_programs("sandbox", "runc", "restore", start_sequence(1), 30, node,
                                   two)
        rng = np.random.default_rng(3)
        arr = np.cumsum(rng.exponential(0.004e9, size=(3, 30)), axis=1).astype(np.int64)
        arr[2, 25:] = INF
        d = draw_nodes(naive, seed=4, chain="sandbox", flavor="runc", phase=0, lo=0, hi=3,
                       pods=30)
        got = _fast_equals_naive(fast, naive, d, arrivals=arr)
        assert (got.end[:, 2, 25:] == INF).all()
        fast, naive = _ps_programs("shim", "runc", "restore", stop_sequence(2), 8, node, two)
        d = draw_nodes(naive, seed=5, chain="shim", flavor="runc", phase=1, lo=0, hi=2,
                       pods=20)
        t0 = np.array([3_000_000, 9_000_000], dtype=np.int64)
        _fast_equals_naive(fast, naive, d, concurrency=8, t0=t0)


def test_the_setting_reaches_the_model():
    """Same realisation, one core: the two disciplines give different timelines, and under
    sharing a short step no longer waits for a long one to finish (SimPy reference)."""
    node = {"cores": 1, "engine_workers": 4, "sandboxer_workers": 4, "vmm_boots": 4}
    model = CAL.model("shim", "runc", "restore")
    calls = start_sequence(1)
    fifo = build_program(model, calls, node, 4, sharing="fifo")
    ps = build_program(model, calls, node, 4, sharing="ps")
    assert (fifo.sharing, ps.sharing) == ("fifo", "ps")
    d = draw_nodes(fifo, seed=2, chain="shim", flavor="runc", phase=0, lo=0, hi=1, pods=4)
    assert not np.array_equal(simulate_nodes(fifo, d, concurrency=4).end,
                              simulate_nodes(ps, d, concurrency=4).end)
    assert _serve(1, [(0, 50 * MS), (MS, 2 * MS)]) == [52 * MS, 5 * MS]


def test_ps_golden_realisation_digest():
    fast, naive = _ps_programs("shim", "runc", "restore", start_sequence(1), 6, two=True)
    digest = _seeded_digest(fast, naive, "shim", 12, 6)
    assert digest == GOLDEN_PS, digest


# Changed on purpose (was 237257edee422c14): shim.launch, as in test_sim_fast's GOLDEN.
GOLDEN_PS = "814fb9c3c3a1dfef"


def test_core_sharing_setting_and_calibration_field():
    assert parse_settings({"core_sharing": "fifo"}).core_sharing == "fifo"
    assert parse_settings({}).core_sharing is None  # the calibration's
    with pytest.raises(SettingsError, match="core_sharing"):
        parse_settings({"core_sharing": "round-robin"})
    data = CAL.to_json()
    assert data["core_sharing"] == "ps"
    assert Calibration.from_json(dict(data, core_sharing="fifo")).core_sharing == "fifo"
    old = {k: v for k, v in data.items() if k != "core_sharing"}
    assert Calibration.from_json(old).core_sharing == "ps"
    with pytest.raises(CalibrationError, match="core_sharing"):
        Calibration.from_json(dict(data, core_sharing="lifo"))


def test_simulations_in_threads_do_not_share_work_arrays():
    """A Dask worker runs several simulations at once in threads of one process: the fast
    path's reused work buffer must be per thread (it was per process, and a sweep broke)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for i, (chain, pods) in enumerate([("shim", 40), ("sandbox", 30), ("shim", 25),
                                       ("sandbox", 45)]):
        fast, naive = _ps_programs(chain, "runc", "restore", start_sequence(1), 10, two=True)
        d = draw_nodes(naive, seed=20 + i, chain=chain, flavor="runc", phase=0, lo=0, hi=8,
                       pods=pods)
        jobs.append((fast, d))
    alone = [simulate_nodes(p, d, concurrency=10).end for p, d in jobs]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            together = list(ex.map(lambda job: simulate_nodes(job[0], job[1],
                                                              concurrency=10).end, jobs))
            for a, b in zip(alone, together):
                assert np.array_equal(a, b)


def _with_offpath(model, seconds):
    """The model with an off-path CPU job at RunPodSandbox's last step and at every
    container's task.start (Step.offpath)."""
    from dataclasses import replace

    from sim.vocabulary import CALL_RUN_POD, CALL_START_CONTAINER

    calls = {}
    for call, steps in model.calls.items():
        steps = list(steps)
        if call == CALL_RUN_POD:
            steps[-1] = replace(steps[-1], offpath=seconds)
        elif call == CALL_START_CONTAINER:
            steps = [replace(s, offpath=seconds / 2) if s.step == "task.start" else s
                     for s in steps]
        calls[call] = tuple(steps)
    return replace(model, calls=calls)


@pytest.mark.parametrize("sharing", ["ps", "fifo"])
@pytest.mark.parametrize("chain", ["shim", "sandbox"])
@pytest.mark.parametrize("conc,pods,containers,node", [
    (1, 8, 1, None), (10, 40, 1, None), (6, 24, 2, None), (30, 30, 1, None),
    (8, 30, 1, {"cores": 1, "engine_workers": 2, "sandboxer_workers": 2, "vmm_boots": 1}),
])
def test_offpath_jobs_fast_equals_naive(sharing, chain, conc, pods, containers, node):
    """Off-path CPU (a process no step owns) shares the cores without holding up its pod:
    the compiled loop gives the reference's bits, and the other pods are slower for it."""
    model = _with_offpath(_accept_first(CAL.model(chain, "runc", "restore")), 0.02)
    caps = node or CAL.node
    calls = start_sequence(containers)
    fast = build_program(model, calls, caps, min(conc, pods), prune=True, sharing=sharing)
    naive = build_program(model, calls, caps, min(conc, pods), prune=False, sharing=sharing)
    assert any(off for _, off in fast.stages)
    d = draw_nodes(naive, seed=11, chain=chain, flavor="runc", phase=0, lo=0, hi=3, pods=pods)
    got = _fast_equals_naive(fast, naive, d, concurrency=conc)
    plain = build_program(_accept_first(CAL.model(chain, "runc", "restore")), calls, caps,
                          min(conc, pods), prune=True, sharing=sharing)
    base = simulate_nodes(plain, d, concurrency=conc)
    if conc > 1:
        assert got.done.sum() > base.done.sum()
    else:  # one pod at a time: its own off-path job only shares the cores with its next steps
        assert got.done.sum() >= base.done.sum()


def test_offpath_is_a_step_field_with_a_check():
    from dataclasses import replace

    from sim.chains import ChainError, Step

    s = CAL.model("shim", "runc").steps("RunPodSandbox")[-1]
    with_off = replace(s, offpath=0.013)
    assert Step.from_json(s.call, with_off.to_json()) == with_off
    assert "offpath" not in s.to_json()
    with pytest.raises(ChainError, match="offpath"):
        replace(s, offpath=-1.0)
