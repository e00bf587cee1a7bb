"""Integration: small real bench runs write valid run dirs and leave nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import loaddriver
from bench.chains import RUN_ROOT, run_leftovers
from reports.schema import load_run

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _summary(out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "summary", str(out), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_run(out: Path, chain: str, pods: int) -> dict:
    run = load_run(out / chain)
    assert run.meta.chain == chain and run.meta.source == "bench"
    assert run.meta.scenario == "runc-seq" and run.meta.scenario_digest
    assert run.meta.host.versions.get("runc") and run.meta.host.versions.get("containerd")
    assert len(run.pods) == pods and (run.pods["outcome"] == "ok").all(), run.pods["error"]
    assert (run.pods["latency_s"] > 0).all() and (run.pods["stop_remove_s"] > 0).all()
    # one client.call span per CRI call: 3 per pod up, 4 per pod down (1 container each)
    client = run.spans[run.spans["step"] == "client.call"]
    assert len(client) == pods * 7
    # memory at each point; the management roles grow with pods
    assert sorted(run.memory["pods_alive"].unique()) == sorted(
        set(run.meta.extra["memory_points"]))
    top = run.memory[run.memory["pods_alive"] == pods]
    assert (top["role"] == "pause").sum() in (0, pods)
    assert (top[["rss", "pss", "uss"]] > 0).all().all()
    assert not run.cpu.empty and (run.cpu["cpu_s"] >= 0).all()
    # the driver's own CPU in this lane's ramp: one precise row (the model's client share)
    client_cpu = run.cpu[run.cpu["role"] == "client"]
    assert len(client_cpu) == 1 and client_cpu["cpu_s"].iloc[0] > 0
    assert client_cpu["pid"].iloc[0] == os.getpid()
    # a pause or container process lives alone in its container's cgroup: its CPU (a few ms)
    # is read there, to the ns, not as 10 ms clock ticks (mostly 0)
    per_pod = run.cpu[run.cpu["role"].isin(["pause", "container"])]
    assert len(per_pod) == pods * (2 if (top["role"] == "pause").any() else 1)
    assert sorted(run.meta.extra["cpu_exact_roles"]) == sorted(per_pod["role"].unique())
    assert (per_pod["cpu_s"] > 0).all()
    assert ((per_pod["cpu_s"] * 100) % 1 > 1e-6).any()  # not whole ticks
    assert run.meta.extra["leftovers"] == []
    # the run's state lived on a tmpfs of its own (bench.statefs), gone with the run
    assert run.meta.extra["run_dir_fs"] in ("tmpfs (mounted for the run)", "tmpfs")
    rid = run.meta.extra["run_id"]
    assert run_leftovers(RUN_ROOT / rid, rid) == []
    return run.meta.extra


def test_bench_containerd_three_pods(tmp_path):
    out = tmp_path / "out"
    rc = loaddriver.main(["runc-seq", "--chain", "containerd", "--out", str(out),
                          "--pods", "3", "--warmup", "1"])
    assert rc == 0
    _check_run(out, "containerd", 3)
    s = _summary(out)
    (r,) = s["runs"]
    assert r["chain"] == "containerd" and r["errors"] == 0 and r["pods"] == 3
    assert r["run_pod_sandbox_ms"]["p50"] > 0
    assert r["mgmt_procs_per_pod"] == pytest.approx(2.0)  # a shim and a pause per pod
    assert r["mgmt_pss_mb_per_pod"] > 0


def test_ctrl_c_tears_down_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "bench", "runc-seq", "--chain", "containerd",
         "--out", str(out), "--pods", "12", "--block", "2"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "ramp 4/12" in line:
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen) + (rest or "")
    assert proc.returncode == 130, text
    assert "clean: no leftover" in text, text
    run = load_run(out / "containerd")
    assert run.meta.extra["interrupted"] is True
    assert 4 <= len(run.pods) < 12
    rid = run.meta.extra["run_id"]
    assert run_leftovers(RUN_ROOT / rid, rid) == []


@pytest.mark.parametrize("chain, extra", [
    ("shim", []),
    ("sandbox", ["--schema", "current"]),
    ("sandbox", ["--schema", "legacy"]),
])
def test_bench_our_chains_three_pods(tmp_path, chain, extra):
    out = tmp_path / "out"
    rc = loaddriver.main(["runc-seq", "--chain", chain, "--out", str(out), "--pods", "3",
                          "--warmup", "1", *extra])
    logs = "\n".join(p.read_text(errors="replace")[-3000:]
                     for p in (out / chain / "logs").glob("*.log"))
    assert rc == 0, logs
    meta = _check_run(out, chain, 3)
    assert meta["schema"] == (extra[1] if extra else "")
    run = load_run(out / chain)
    # the testbed's own spans were merged and keyed by pod name
    steps = set(run.spans[run.spans["call"] == "RunPodSandbox"]["step"])
    assert {"cri.recv", "engine.prepare", "task.connect"} <= steps
    assert set(run.spans["pod"]) <= set(run.pods["pod"])
    roles = set(run.memory["role"])
    assert "engine" in roles
    assert ("sandboxer" in roles) == (chain == "sandbox")
    assert ("shim" in roles) == (chain == "shim")


def test_bench_interleaves_all_chains(tmp_path):
    out = tmp_path / "out"
    rc = loaddriver.main(["runc-seq", "--chain", "shim,sandbox,containerd", "--out", str(out),
                          "--pods", "4", "--warmup", "1", "--block", "2"])
    assert rc == 0
    times = {}
    for chain in ("shim", "sandbox", "containerd"):
        _check_run(out, chain, 4)
        mem = load_run(out / chain).memory
        times[chain] = sorted(mem["t_s"].unique())
    # each chain's memory counts only its own processes
    expect = {"shim": {"engine", "shim", "pause", "container"},
              "sandbox": {"engine", "sandboxer", "container"},
              "containerd": {"containerd", "shim", "pause", "container"}}
    for chain, roles in expect.items():
        assert set(load_run(out / chain).memory["role"]) == roles, chain
    # one sampling instant per memory point, shared by all chains (same machine state)
    assert times["shim"] == times["sandbox"] == times["containerd"]
    s = _summary(out)
    assert sorted(r["chain"] for r in s["runs"]) == ["containerd", "sandbox", "shim"]
