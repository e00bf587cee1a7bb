"""Benchmarks of the model (pytest-benchmark; CI runs each once with --benchmark-disable).

Targets (measured, not asserted — timings belong here, not in tests): >= 100,000 simulated pod
startups per second on one core, and the 1,000,000-pod cluster-1m scenario within 10 s.
Run them for real with:  .venv/bin/pytest tests/test_sim_bench.py --benchmark-enable
"""
from __future__ import annotations

import time
from dataclasses import replace

import pytest

from scenarios.loader import load_scenario
from sim.calibration import load_calibration
from sim.cli_simulate import settings_for
from sim.cluster import simulate_chain

CAL = load_calibration()


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Load the compiled event loop (numba's cache) before the first timing, not inside it."""
    from sim.fast import warm

    warm()


def _run(scenario, settings, chain, info):
    c0, w0 = time.process_time(), time.perf_counter()
    run = simulate_chain(scenario, settings, CAL, chain)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    info["pods"] = run.total_pods
    info["cpu_s"] = round(cpu, 3)
    info["wall_s"] = round(wall, 3)
    info["pods_per_cpu_s"] = round(run.total_pods / max(cpu, 1e-9))
    info["pods_per_wall_s"] = round(run.total_pods / max(wall, 1e-9))
    return run


@pytest.mark.parametrize("sharing", ["ps", "fifo"])
@pytest.mark.parametrize("chain", ["shim", "sandbox"])
def test_bench_fast_100k_pod_burst(benchmark, chain, sharing):
    """100,000 pods: 1,000 nodes x 100 pods, every pod of a node at once (cluster-1m's shape);
    processor-shared cores (the model's default) against FIFO cores (what sharing costs)."""
    sc = load_scenario("cluster-1m")
    st = settings_for(sc, {"nodes": 1000, "core_sharing": sharing})
    run = benchmark.pedantic(_run, args=(sc, st, chain, benchmark.extra_info), rounds=1,
                             iterations=1)
    assert run.total_pods == 100_000
    assert run.extra["aggregate"]["run_pod_sandbox_ms"]["p50"] > 0


def test_bench_naive_reference(benchmark):
    """The plain SimPy model (one process per pod and step) on 2,000 pods, for comparison."""
    sc = load_scenario("cluster-1m")
    st = settings_for(sc, {"nodes": 20, "engine": "naive"})
    run = benchmark.pedantic(_run, args=(sc, st, "shim", benchmark.extra_info), rounds=1,
                             iterations=1)
    assert run.total_pods == 2_000


@pytest.mark.slow
def test_bench_cluster_1m(benchmark):
    """The full 1,000,000-pod scenario for one chain (the scenario runs two)."""
    sc = load_scenario("cluster-1m")
    st = settings_for(sc)
    run = benchmark.pedantic(_run, args=(replace(sc, chains=("sandbox",)), st, "sandbox",
                                         benchmark.extra_info), rounds=1, iterations=1)
    assert run.total_pods == 1_000_000
    assert run.extra["aggregate"]["measured_pods"] == 1_000_000
