"""Tests of the process registry, stray-process finder and mount/tree helpers."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from bench import processes
from bench.processes import ProcessRegistry


def test_spawn_cleanup_kills_process_and_group(tmp_path):
    reg = ProcessRegistry("t")

    async def main():
        # a shell (group leader) with a background child in the same group
        p = await reg.spawn("sh", "-c", f"sleep 300 & exec sleep 301 # {tmp_path}",
                            role="test", label="grp")
        await asyncio.sleep(0.1)
        return p

    p = asyncio.run(main())
    assert [t.pid for t in reg.leftovers()] == [p.pid]
    assert len(processes.find_processes(names=["sleep"], cmdline_contains=["300"])) >= 1
    killed = reg.cleanup(grace=2.0)
    assert killed == [p.pid]
    assert reg.leftovers() == []
    assert processes.find_processes(under=tmp_path) == []
    assert not processes._group_members(p.pid)


def test_term_ignoring_process_gets_sigkill_and_finalizers_run_newest_first():
    reg = ProcessRegistry("t")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             "print('ready', flush=True); time.sleep(300)"],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"ready\n"
    reg.register(proc.pid, "stubborn", group=True)
    order: list[str] = []
    reg.add_finalizer("a", lambda: order.append("a"))
    tok = reg.add_finalizer("b", lambda: order.append("b"))
    reg.add_finalizer("c", lambda: order.append("c"))
    reg.add_finalizer("boom", lambda: 1 / 0)  # a failing finalizer does not stop the others
    reg.release(tok)
    assert reg.cleanup(grace=0.2) == [proc.pid]
    assert proc.wait(5) == -signal.SIGKILL
    assert order == ["c", "a"]
    assert reg.leftovers() == [] and reg.finalizers() == []


def test_run_returns_output_and_unregisters():
    reg = ProcessRegistry("t")
    rc, out, err = asyncio.run(reg.run("sh", "-c", "echo out; echo err >&2; exit 3",
                                       role="t"))
    assert (rc, out, err) == (3, b"out\n", b"err\n")
    assert reg.tracked() == []


def test_run_timeout_kills_child():
    reg = ProcessRegistry("t")
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(reg.run("sleep", "302", role="t", timeout=0.2))
    assert reg.tracked() == []
    assert processes.find_processes(names=["sleep"], cmdline_contains=["302"]) == []


def test_pid_reuse_guard():
    reg = ProcessRegistry("t")
    p = subprocess.Popen(["sleep", "303"])
    t = reg.register(p.pid, "t")
    assert t.alive()
    t.start_ticks = (t.start_ticks or 0) + 1  # same pid, different process
    assert not t.alive()
    p.kill()
    p.wait()


def test_zombie_counts_as_dead():
    p = subprocess.Popen(["true"])
    reg = ProcessRegistry("t")
    t = reg.register(p.pid, "t")
    for _ in range(200):
        if processes._read_stat(p.pid)[0] == "Z":
            break
        import time
        time.sleep(0.01)
    assert not t.alive()
    p.wait()


def test_unmount_below_and_remove_tree(tmp_path):
    base = tmp_path / "base"
    (base / "a" / "b").mkdir(parents=True)
    (base / "with space").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base / "a")], check=True)
    try:
        (base / "a" / "b").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base / "a" / "b")], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base / "with space")], check=True)
        mps = processes.mounts_below(base)
        assert mps[0] == str(base / "a" / "b")  # deepest first
        assert set(mps) == {str(base / "a"), str(base / "a" / "b"), str(base / "with space")}
        processes.remove_tree(base)
        assert not base.exists()
        assert processes.mounts_below(tmp_path) == []
    finally:
        processes.unmount_below(tmp_path)


def test_remove_tree_refuses_top_level():
    with pytest.raises(ValueError):
        processes.remove_tree("/")
    with pytest.raises(ValueError):
        processes.remove_tree("/tmp")
    processes.remove_tree("/tmp/does-not-exist-chainbench-x")  # missing is fine


def test_signal_handler_cleans_and_exits(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import os, signal, subprocess, sys, time\n"
        "from bench import processes\n"
        "p = subprocess.Popen(['sleep', '304'], start_new_session=True)\n"
        "processes.REGISTRY.register(p.pid, 'child', group=True)\n"
        "processes.install_signal_handlers()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            cwd=os.getcwd())
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert processes.process_start_ticks(child) is None or \
        processes._read_stat(child)[0] == "Z"
