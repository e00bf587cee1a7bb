"""The cgroup CPU probe reads the kernel's ns-precise accounting of a real cgroup."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.probes import cgroup_cpu

V1 = Path("/sys/fs/cgroup/cpuacct")
V2 = Path("/sys/fs/cgroup/cgroup.controllers")


def _new_cgroup() -> Path:
    name = f"chainbench-probe-test-{os.getpid()}"
    base = V1 if V1.is_dir() else Path("/sys/fs/cgroup")
    path = base / name
    path.mkdir()
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a cgroup needs root (CI runs as root)")
def test_cgroup_cpu_counts_a_busy_process_to_the_ns_and_none_at_the_root():
    assert V1.is_dir() or V2.exists()
    assert cgroup_cpu(1) is None or cgroup_cpu(1)[0] not in ("", "/")
    path = _new_cgroup()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.15: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()\n" + burn],
                            stdin=subprocess.PIPE)
    try:
        (path / "cgroup.procs").write_text(str(proc.pid))
        proc.stdin.close()  # now it burns 150 ms of CPU inside the cgroup
        deadline = time.monotonic() + 20
        got = cgroup_cpu(proc.pid)
        while proc.poll() is None and time.monotonic() < deadline:
            got = cgroup_cpu(proc.pid) or got
            time.sleep(0.01)
        assert got is not None
        group, used = got
        assert group.endswith(path.name)
        assert 0.1 <= used < 5.0
        assert round(used, 2) != used  # ns-precise, not whole 10 ms ticks
    finally:
        proc.kill()
        proc.wait()
        for _ in range(50):  # the cgroup empties once the process is reaped
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    assert not path.exists()
