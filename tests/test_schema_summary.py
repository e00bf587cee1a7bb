"""Result schema round trip and summary figures derived from raw tables."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from reports.schema import HostFacts, RunMeta, SchemaError, find_runs, load_run, write_run
from reports.summary import summarize, summarize_paths


def _write(tmp_path, chain="shim", n=10, shim_pss=2_000_000):
    pods, spans, memory = [], [], []
    for i in range(n):
        lat = 0.010 + 0.001 * i
        pods.append(dict(pod=f"p{i}", submit_s=i * 0.1, ready_s=i * 0.1 + lat, latency_s=lat,
                         create_start_s=0.02, stop_remove_s=0.03, outcome="ok", error="",
                         warmup=i == 0))
        spans.append(dict(pod=f"p{i}", call="RunPodSandbox", step="shim.spawn",
                          component="engine", start_ns=1000, end_ns=1000 + 6_000_000))
    for t, alive in enumerate((0, 5, 10)):
        memory.append(dict(t_s=float(t), role="engine", pid=1, rss=50_000_000, pss=40_000_000,
                           uss=30_000_000, threads=4, pods_alive=alive))
        for k in range(alive):
            memory.append(dict(t_s=float(t), role="shim", pid=100 + k, rss=shim_pss * 2,
                               pss=shim_pss, uss=shim_pss // 2, threads=8, pods_alive=alive))
    meta = RunMeta(scenario="s", source="bench", chain=chain, flavor="runc", pods=n,
                   concurrency=1, host=HostFacts.collect(accel="tcg"))
    return write_run(tmp_path / chain, meta, pods=pods, spans=spans, memory=memory,
                     cpu=[dict(role="engine", pid=1, cpu_s=0.5)])


def test_round_trip_and_summary(tmp_path):
    d = _write(tmp_path)
    run = load_run(d)
    assert run.meta.chain == "shim" and run.meta.host.accel == "tcg"
    assert len(run.pods) == 10 and run.pods["warmup"].sum() == 1
    s = summarize(run)
    # Warm-up pod excluded: latencies 11..19 ms.
    assert s["run_pod_sandbox_ms"]["p50"] == pytest.approx(np.percentile(
        [10 + i for i in range(1, 10)], 50), rel=1e-6)
    assert s["mgmt_pss_mb_per_pod"] == pytest.approx(2_000_000 / 1024 / 1024, rel=1e-3)
    assert s["mgmt_procs_per_pod"] == pytest.approx(1.0)
    assert s["steps_ms"]["shim.spawn"]["p50"] == pytest.approx(6.0)
    assert s["errors"] == 0


def test_summary_json_keys_and_discovery(tmp_path):
    _write(tmp_path, "shim")
    _write(tmp_path, "sandbox", shim_pss=0)
    assert len(find_runs([tmp_path])) == 2
    out = subprocess.run([sys.executable, "-m", "bench.cli", "summary", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    keys = {"chain", "flavor", "source", "scenario", "pods", "concurrency", "errors",
            "run_pod_sandbox_ms", "pods_per_s", "create_start_container_ms", "stop_remove_ms",
            "mgmt_pss_mb_per_pod", "mgmt_rss_mb_per_pod", "mgmt_procs_per_pod", "steps_ms"}
    assert {r["chain"] for r in data["runs"]} == {"shim", "sandbox"}
    for r in data["runs"]:
        assert keys <= set(r)
        assert set(r["run_pod_sandbox_ms"]) == {"p50", "p95", "p99"}


def test_bad_inputs(tmp_path):
    with pytest.raises(SchemaError, match="no such directory"):
        summarize_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SchemaError, match="no run.json"):
        summarize_paths([tmp_path / "empty"])
    with pytest.raises(SchemaError, match="lacks columns"):
        write_run(tmp_path / "x", RunMeta("s", "bench", "shim", "runc"), pods=[{"pod": "a"}])
    out = subprocess.run([sys.executable, "-m", "bench.cli", "summary", str(tmp_path / "empty")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no run.json" in out.stderr


def test_step_timed_by_two_components_is_not_double_counted(tmp_path):
    pods = [dict(pod="p", submit_s=0.0, ready_s=0.01, latency_s=0.01, create_start_s=0.0,
                 stop_remove_s=0.0, outcome="ok", error="", warmup=False)]
    spans = [  # engine times the RPC (5 ms), the sandboxer its inside (4 ms), plus a retry
        dict(pod="p", call="RunPodSandbox", step="sandbox.start", component="engine",
             start_ns=0, end_ns=5_000_000),
        dict(pod="p", call="RunPodSandbox", step="sandbox.start", component="sandboxer",
             start_ns=500_000, end_ns=4_500_000),
        dict(pod="p", call="RunPodSandbox", step="task.connect", component="engine",
             start_ns=0, end_ns=1_000_000),
        dict(pod="p", call="RunPodSandbox", step="task.connect", component="engine",
             start_ns=2_000_000, end_ns=3_000_000),
    ]
    d = write_run(tmp_path / "r", RunMeta("s", "bench", "sandbox", "runc"), pods=pods,
                  spans=spans)
    steps = summarize(load_run(d))["steps_ms"]
    assert steps["sandbox.start"]["p50"] == pytest.approx(5.0)
    assert steps["task.connect"]["p50"] == pytest.approx(2.0)
