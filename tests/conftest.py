"""Owns: the shared pytest fixtures — today one: `leak_check`, proof that a test left nothing.

    def test_x(leak_check, tmp_path):
        leak_check.watch_dir(tmp_path)            # no process, mount below it at teardown
        leak_check.watch_socket("/run/x.sock")    # gone at teardown
        leak_check.watch_cgroup("chainbench/p1")  # no /sys/fs/cgroup/*/chainbench/p1
        ...

At teardown it asserts that nothing tracked in the process registry (bench.processes) since the
fixture started is still alive, then checks the watched items; on a leak it cleans up (so one
failing test does not poison the next) and fails.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench import processes


@dataclass
class LeakCheck:
    dirs: list[Path] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    before: set[int] = field(default_factory=set)

    def watch_dir(self, path: str | os.PathLike[str]) -> None:
        self.dirs.append(Path(path))

    def watch_socket(self, path: str) -> None:
        self.sockets.append(path)

    def watch_cgroup(self, rel: str) -> None:
        self.cgroups.append(rel.strip("/"))

    def problems(self) -> list[str]:
        out = [f"tracked {t.role} {t.label} pid {t.pid} still alive"
               for t in processes.leftovers() if t.pid not in self.before]
        for d in self.dirs:
            out += [f"process {p.pid} {' '.join(p.cmdline)[:120]} under {d}"
                    for p in processes.find_processes(under=d)]
            if d.exists():
                out += [f"mount {m}" for m in processes.mounts_below(d)]
        out += [f"socket {s} left" for s in self.sockets if os.path.exists(s)]
        for cg in self.cgroups:
            out += [f"cgroup {p} left" for p in glob.glob(f"/sys/fs/cgroup/*/{cg}")]
        return out


@pytest.fixture
def leak_check() -> LeakCheck:
    lc = LeakCheck(before={t.pid for t in processes.leftovers()})
    yield lc
    found = lc.problems()
    if found:
        processes.cleanup(grace=1.0)
        for d in lc.dirs:
            if d.exists():
                processes.unmount_below(d)
    assert not found, "leaked: " + "; ".join(found)
