"""Limited processor sharing (`[sim] core_limit`): at most N jobs share the cores, later ones
wait in arrival order — the reference server, and the fast model equal to it bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from sim.calibration import prior_calibration
from sim.chains import ChainError, build_program, start_sequence, stop_sequence
from sim.fast import simulate_nodes
from sim.model import draw_nodes
from sim.scenario_model import SettingsError, parse_settings
from test_sim_fast import _fast_equals_naive
from test_sim_ps import _accept_first, _serve, _with_offpath

CAL = prior_calibration()
MS = 1_000_000


def test_limit_one_serves_in_arrival_order():
    assert _serve(1, [(0, 10 * MS)] * 3, limit=1) == [10 * MS, 20 * MS, 30 * MS]


def test_limit_two_on_one_core_shares_two_then_lets_the_third_in():
    # A and B at half speed until 20 ms; C waits, then runs alone: 30 ms.
    assert _serve(1, [(0, 10 * MS)] * 3, limit=2) == [20 * MS, 20 * MS, 30 * MS]


def test_a_limit_above_the_jobs_in_flight_is_plain_sharing():
    jobs = [(0, 6 * MS), (MS, 4 * MS), (2 * MS, 9 * MS), (2 * MS, 3 * MS)]
    assert _serve(2, jobs, limit=4) == _serve(2, jobs)


@pytest.mark.parametrize("chain", ["shim", "sandbox"])
@pytest.mark.parametrize("limit", [1, 2, 4])
@pytest.mark.parametrize("conc,pods,containers,node", [
    (10, 40, 1, None), (6, 24, 2, None), (30, 30, 1, None),
    (8, 30, 1, {"cores": 1, "engine_workers": 2, "sandboxer_workers": 2, "vmm_boots": 1}),
])
def test_limited_sharing_fast_equals_naive(chain, limit, conc, pods, containers, node):
    """With off-path jobs and two-limit steps in play, the compiled loop gives the
    reference's bits; and the limit changes the result (it is not ignored)."""
    model = _with_offpath(_accept_first(CAL.model(chain, "runc", "restore")), 0.02)
    caps = node or CAL.node
    calls = start_sequence(containers)
    n = min(conc, pods)
    fast = build_program(model, calls, caps, n, prune=True, sharing="ps", ps_limit=limit)
    naive = build_program(model, calls, caps, n, prune=False, sharing="ps", ps_limit=limit)
    assert fast.ps_limit == limit
    d = draw_nodes(naive, seed=13, chain=chain, flavor="runc", phase=0, lo=0, hi=3, pods=pods)
    got = _fast_equals_naive(fast, naive, d, concurrency=conc)
    plain = build_program(model, calls, caps, n, prune=True, sharing="ps")
    assert not np.array_equal(got.end, simulate_nodes(plain, d, concurrency=conc).end)


def test_stop_phase_and_open_loop_with_a_limit_equal_naive():
    model = _accept_first(CAL.model("shim", "runc", "restore"))
    fast = build_program(model, stop_sequence(1), CAL.node, 12, prune=True, sharing="ps",
                         ps_limit=3)
    naive = build_program(model, stop_sequence(1), CAL.node, 12, prune=False, sharing="ps",
                          ps_limit=3)
    d = draw_nodes(naive, seed=4, chain="shim", flavor="runc", phase=1, lo=0, hi=2, pods=12)
    _fast_equals_naive(fast, naive, d, concurrency=12)
    arr = np.sort(np.random.default_rng(2).integers(0, 40 * MS, size=(2, 12)), axis=1)
    _fast_equals_naive(fast, naive, d, arrivals=arr.astype(np.int64))


def test_the_setting_is_checked_and_fifo_ignores_it():
    assert parse_settings({"core_limit": 4}).core_limit == 4
    assert parse_settings({}).core_limit == 0
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(SettingsError, match="core_limit"):
            parse_settings({"core_limit": bad})
    model = CAL.model("shim", "runc", "restore")
    assert build_program(model, start_sequence(1), CAL.node, 10, sharing="fifo",
                         ps_limit=4).ps_limit == 0
    with pytest.raises(ChainError, match="ps_limit"):
        build_program(model, start_sequence(1), CAL.node, 10, sharing="ps", ps_limit=-2)
