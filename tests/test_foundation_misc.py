"""Scenario loader, step vocabulary, tracing and CLI routing."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bench.tracing import Tracer, read_spans
from scenarios.loader import ScenarioError, load_scenario, parse_scenario
from sim.vocabulary import RUN_POD_STEPS, STEPS, StepRef


def test_shipped_scenarios_load():
    seq = load_scenario("runc-seq")
    c10 = load_scenario("runc-c10")
    assert (seq.pods, seq.concurrency) == (20, 1)
    assert (c10.pods, c10.concurrency) == (50, 10)
    assert set(seq.chains) == {"shim", "sandbox", "containerd"}
    assert seq.digest and seq.digest != c10.digest
    assert c10.memory_points()[-1] == 50


@pytest.mark.parametrize("text,msg", [
    ("pods = 3", "'name' is required"),
    ("name='x'\npods = 0", "pods must be an integer >= 1"),
    ("name='x'\nchains=['kata']", "not in"),
    ("name='x'\nbogus=1", "unknown keys"),
    ("name='x'\nmemory_at=[99]\npods=3", "memory_at"),
    ("name = ", "invalid TOML"),
    ("name='x'\nvm_pool=-1", "vm_pool must be an integer >= 0"),
    ("name='x'\nvm_pool_mode='warm'", "vm_pool_mode must be"),
])
def test_scenario_errors(text, msg):
    with pytest.raises(ScenarioError, match=msg):
        parse_scenario(text)


def test_vm_pool_keys():
    assert load_scenario("runc-seq").vm_pool == 0
    cache = load_scenario("microvm-seq-vmcache")
    assert (cache.vm_pool, cache.vm_pool_mode) == (2, "restored")
    sc = parse_scenario("name='x'\nflavor='microvm'\nvm_pool=3")
    assert (sc.vm_pool, sc.vm_pool_mode) == (3, "spawned")


def test_unknown_scenario_lists_shipped():
    with pytest.raises(ScenarioError, match="runc-seq"):
        load_scenario("does-not-exist")


def test_vocabulary_closed():
    for steps in RUN_POD_STEPS.values():
        assert all(s.step in STEPS for s in steps)
    with pytest.raises(ValueError, match="unknown step"):
        StepRef("shim.sapwn", "engine")


def test_tracer_records_and_reads(tmp_path):
    t = Tracer.from_dir(tmp_path, "engine")
    with t.span("p1", "RunPodSandbox", "engine.prepare"):
        pass
    with pytest.raises(RuntimeError):
        with t.span("p1", "RunPodSandbox", "shim.spawn"):
            raise RuntimeError("boom")  # failed steps are still recorded
    with pytest.raises(ValueError):
        t.record("p1", "RunPodSandbox", "not.a.step", 0, 1)
    t.flush()
    rows = read_spans(tmp_path)
    assert [r["step"] for r in rows] == ["engine.prepare", "shim.spawn"]
    assert all(r["end_ns"] >= r["start_ns"] and r["component"] == "engine" for r in rows)
    disabled = Tracer.from_dir(None, "engine")
    with disabled.span("p", "RunPodSandbox", "cri.recv"):
        pass
    assert not disabled.enabled


def test_cli_usage_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "bench.cli", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "summary" in out.stdout and "doctor" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.cli", "frobnicate"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_slowdown_knob_stretches_only_its_step(tmp_path, monkeypatch):
    import asyncio

    from bench.tracing import parse_slowdown

    with pytest.raises(ValueError, match="unknown step"):
        parse_slowdown("task.craete:0.3")
    with pytest.raises(ValueError, match="STEP:FRACTION"):
        parse_slowdown("task.create")
    monkeypatch.setenv("CHAINBENCH_SLOWDOWN", "task.create:1.0")
    t = Tracer.from_dir(tmp_path, "engine")

    async def body() -> None:
        async with t.aspan("p", "RunPodSandbox", "task.create"):
            await asyncio.sleep(0.02)
        async with t.aspan("p", "RunPodSandbox", "task.start"):
            await asyncio.sleep(0.02)

    asyncio.run(body())
    t.flush()
    d = {r["step"]: r["end_ns"] - r["start_ns"] for r in read_spans(tmp_path)}
    # A 100% slowdown at least doubles task.create (sleeps never end early); task.start is
    # recorded without any added sleep.
    assert d["task.create"] >= 2 * 0.02e9
    assert d["task.start"] >= 0.02e9 and t.slowdown == {"task.create": 1.0}


def test_doctor_passes_after_setup():
    """`make test` runs the set-up first, so every required prerequisite must be present."""
    import json

    out = subprocess.run([sys.executable, "-m", "bench.cli", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120)
    data = json.loads(out.stdout)
    missing = [c for c in data["checks"] if c["required"] and not c["ok"]]
    assert out.returncode == 0 and not missing, missing
    assert data["accel"] in ("kvm", "tcg")
    names = {c["name"] for c in data["checks"]}
    assert {"runc", "containerd-shim-runc-v2", "qemu-system-x86_64", "guest kernel"} <= names
