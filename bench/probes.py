"""Owns: process probes — memory (smaps_rollup), threads, CPU time and role classification.

The load driver samples each chain's own processes only: a chain is described by its root pids
(its daemons), the directories its shims run in and the cgroup parent its pods are placed in.
Everything else on the machine (other chains, the driver itself) is ignored, so chains that run
side by side in one session never count each other's memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from bench.doctor import accel_mode, tool_versions

_CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = [
    "MemSample", "ProcInfo", "ChainScope", "read_memory", "read_threads", "cpu_seconds",
    "cgroup_cpu",
    "process_table", "descendants", "classify", "scope_processes", "tool_versions", "accel_mode",
]


@dataclass(frozen=True)
class MemSample:
    rss: int  # bytes
    pss: int
    uss: int  # Private_Clean + Private_Dirty


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    exe: str  # basename of /proc/PID/exe ("" when unreadable, e.g. a zombie)
    argv: tuple[str, ...]
    cwd: str
    cgroup: str  # path in the memory (or first named) v1 hierarchy


def read_memory(pid: int) -> MemSample | None:
    """PSS/RSS/USS of one process from smaps_rollup; None when it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    vals: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":"):
            try:
                vals[parts[0][:-1]] = int(parts[1]) * 1024  # kB
            except ValueError:
                continue
    if "Rss" not in vals:
        return None  # kernel threads and zombies have an empty rollup
    uss = vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0)
    return MemSample(rss=vals["Rss"], pss=vals.get("Pss", 0), uss=uss)


def read_threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    head, _, tail = raw.rpartition(")")
    if not head:
        return None
    return tail.split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the process itself (children that were reaped are not included)."""
    f = _stat_fields(pid)
    if f is None or len(f) < 13:
        return None
    return (int(f[11]) + int(f[12])) / _CLK_TCK


def cpu_children_seconds(pid: int) -> float | None:
    """cutime + cstime: CPU of the process's children it has reaped (runc under a shim or the
    sandboxer, `shim start` under the engine), which utime/stime never include."""
    f = _stat_fields(pid)
    if f is None or len(f) < 15:
        return None
    return (int(f[13]) + int(f[14])) / _CLK_TCK


_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu(pid: int) -> tuple[str, float] | None:
    """(cgroup, CPU seconds of every process ever in it) from the kernel's ns-precise cgroup
    accounting (v1 cpuacct.usage, v2 cpu.stat usage_usec), or None when the process sits in
    a root cgroup (shared with the whole machine) or the files are unreadable.

    For a container's own cgroup this is what /proc/PID/stat cannot give: its processes run
    for a few ms each (runc init, then the exec), and the stat fields round each part down to
    a 10 ms tick — 0 for two thirds of them."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "cpuacct" in parts[1].split(","):
            v1 = (parts[1], parts[2])
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    try:
        if v1 is not None and v1[1] not in ("", "/"):
            path = _CGROUP_ROOT / v1[0] / v1[1].lstrip("/") / "cpuacct.usage"
            return v1[1], int(path.read_text()) / 1e9
        if v1 is None and v2 not in (None, "", "/"):
            stat = (_CGROUP_ROOT / str(v2).lstrip("/") / "cpu.stat").read_text()
            for line in stat.splitlines():
                key, _, val = line.partition(" ")
                if key == "usage_usec":
                    return str(v2), int(val) / 1e6
    except (OSError, ValueError):
        return None
    return None


def _read_cgroup(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return ""
    fallback = ""
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            return parts[2]
        if parts[1] == "" and not fallback:  # cgroup v2 unified line
            fallback = parts[2]
        elif parts[1] == "pids":
            fallback = parts[2]
    return fallback


def proc_info(pid: int) -> ProcInfo | None:
    f = _stat_fields(pid)
    if f is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        comm = raw[raw.index("(") + 1: raw.rindex(")")]
        argv = tuple(a for a in Path(f"/proc/{pid}/cmdline").read_bytes()
                     .decode(errors="replace").split("\0") if a)
    except (OSError, ValueError):
        return None
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    return ProcInfo(pid=pid, ppid=int(f[1]), comm=comm, exe=exe.removesuffix(" (deleted)"),
                    argv=argv, cwd=cwd, cgroup=_read_cgroup(pid))


def process_table() -> dict[int, ProcInfo]:
    table: dict[int, ProcInfo] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_info(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(roots: Iterable[int], table: dict[int, ProcInfo]) -> set[int]:
    """The roots that still exist and every process below them."""
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out: set[int] = set()
    stack = [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out.add(pid)
        stack.extend(children.get(pid, ()))
    return out


@dataclass
class ChainScope:
    """What belongs to one chain: daemons by pid, shims by working directory, pods by cgroup."""

    daemons: dict[int, str] = field(default_factory=dict)  # pid -> role (engine, sandboxer, ...)
    dirs: tuple[str, ...] = ()  # a shim/VMM whose cwd or argv lies under one of these is ours
    cgroup_parent: str = ""  # pods' cgroup parent (e.g. /chainbench-ab12/shim)
    pause_names: frozenset[str] = frozenset({"pause"})


def _under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs if d)


def _is_shim(p: ProcInfo) -> bool:
    name = p.exe or p.comm
    return name.startswith("containerd-shim") or (
        bool(p.argv) and os.path.basename(p.argv[0]).startswith("containerd-shim")) or (
        # our microVM shim runs as `python -m bench.vmshim ...` (its wrapper script execs)
        "bench.vmshim" in p.argv[1:3])


def classify(p: ProcInfo, scope: ChainScope) -> str:
    """Role of a process already known to be in the chain's scope."""
    if p.pid in scope.daemons:
        return scope.daemons[p.pid]
    if _is_shim(p) or (p.argv and "shim" in p.argv[1:2]):
        return "shim"
    name = p.exe or p.comm
    if name in scope.pause_names or (p.argv and os.path.basename(p.argv[0]) in scope.pause_names):
        return "pause"
    if name.startswith("qemu-system") or p.comm.startswith("qemu-system"):
        return "vmm"
    return "container"


def scope_processes(scope: ChainScope, table: dict[int, ProcInfo] | None = None
                    ) -> dict[int, tuple[ProcInfo, str]]:
    """pid -> (info, role) for every live process of the chain.

    Transient runc/ctr helpers are skipped: the driver samples between calls, and a runc caught
    mid-flight would be noise, not footprint.
    """
    table = process_table() if table is None else table
    roots: set[int] = set(scope.daemons)
    for p in table.values():
        if _is_shim(p) and (_under(p.cwd, scope.dirs) or any(_under(a, scope.dirs) for a in p.argv)):
            roots.add(p.pid)
        elif scope.cgroup_parent and _under(p.cgroup, (scope.cgroup_parent,)):
            roots.add(p.pid)
    out: dict[int, tuple[ProcInfo, str]] = {}
    for pid in descendants(roots, table):
        p = table[pid]
        if (p.exe or p.comm) in ("runc", "ctr", "runc:[2:INIT]") or p.comm.startswith("runc"):
            continue
        out[pid] = (p, classify(p, scope))
    return out
