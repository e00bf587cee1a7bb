"""Tests of bench/probes.py on real processes: smaps_rollup figures, CPU time, scope and roles."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from bench import probes
from bench.runtimes.assets import ensure_pause


def test_memory_of_self_is_positive():
    m = probes.read_memory(os.getpid())
    assert m is not None
    assert m.rss > 0 and m.pss > 0 and m.uss > 0
    assert m.uss <= m.pss <= m.rss
    assert probes.read_threads(os.getpid()) >= 1
    assert probes.cpu_seconds(os.getpid()) > 0


def test_gone_process_reads_none():
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    assert probes.read_memory(p.pid) is None
    assert probes.cpu_seconds(p.pid) is None


def test_scope_classifies_daemon_tree(tmp_path):
    """A 'daemon' with a pause child and a workload child: roles from the pid tree and exe."""
    pause = ensure_pause()
    code = (
        "import subprocess, sys, time\n"
        f"a = subprocess.Popen([{str(pause)!r}])\n"
        "b = subprocess.Popen(['/bin/sleep', '60'])\n"
        "print('ok', flush=True)\n"
        "time.sleep(60)\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              cwd=tmp_path, start_new_session=True)
    try:
        assert daemon.stdout.readline().strip() == b"ok"
        scope = probes.ChainScope(daemons={daemon.pid: "engine"}, dirs=(str(tmp_path),))
        found = {}
        for _ in range(100):  # the children exec a moment after being forked
            found = probes.scope_processes(scope)
            roles = sorted(r for _, r in found.values())
            if roles == ["container", "engine", "pause"]:
                break
            time.sleep(0.02)
        roles = {r: pid for pid, (_, r) in found.items()}
        assert sorted(roles) == ["container", "engine", "pause"], found
        assert roles["engine"] == daemon.pid
        for pid in roles.values():
            m = probes.read_memory(pid)
            assert m is not None and m.rss > 0 and m.pss > 0
        # our own process is not in the scope: the driver never counts itself
        assert os.getpid() not in found
        # an unrelated scope sees none of them
        assert not set(found) & set(probes.scope_processes(probes.ChainScope(daemons={})))
    finally:
        os.killpg(daemon.pid, 9)
        daemon.wait()


def test_classify_pure_logic():
    scope = probes.ChainScope(daemons={10: "sandboxer"})
    mk = lambda pid, exe, argv=(): probes.ProcInfo(pid, 1, exe[:15], exe, tuple(argv), "/", "")
    assert probes.classify(mk(10, "python3"), scope) == "sandboxer"
    assert probes.classify(mk(11, "containerd-shim-runc-v2"), scope) == "shim"
    assert probes.classify(mk(12, "pause", ["/pause"]), scope) == "pause"
    assert probes.classify(mk(13, "qemu-system-x86_64"), scope) == "vmm"
    assert probes.classify(mk(14, "busybox", ["/bin/sleep", "1"]), scope) == "container"


def test_descendants_follow_tree():
    t = {1: probes.ProcInfo(1, 0, "a", "a", (), "/", ""),
         2: probes.ProcInfo(2, 1, "b", "b", (), "/", ""),
         3: probes.ProcInfo(3, 2, "c", "c", (), "/", ""),
         4: probes.ProcInfo(4, 9, "d", "d", (), "/", "")}
    assert probes.descendants([2], t) == {2, 3}
    assert probes.descendants([1, 99], t) == {1, 2, 3}


def test_tool_versions_parse():
    v = probes.tool_versions()
    assert v["python"].count(".") >= 1
    assert v["runc"][0].isdigit() and v["containerd"][0].isdigit()
