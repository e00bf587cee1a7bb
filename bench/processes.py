"""Owns: tracking and cleanup of every child process, container and mount the testbed creates.

A `ProcessRegistry` records each process we start (pid, role, label, process group, start time)
and any *finalizer* that must run to undo something a kill alone does not undo (a runc container
needs `runc delete --force`, a dead shim needs its `delete` action).  `cleanup()` sends SIGTERM to
every live tracked process or group, waits a grace period, SIGKILLs the rest, then runs the
finalizers newest first.  The module-level `REGISTRY` is cleaned at interpreter exit; a CLI may also
call `install_signal_handlers()` so SIGINT/SIGTERM clean up before the process dies.

Liveness is judged from /proc (start time guards against pid reuse, zombies count as dead) so
checking never reaps a child behind asyncio's back.

Also here: finding stray processes that mention a directory (tests prove nothing leaked), and
unmounting everything below a directory / removing a tree without crossing into a live mount.
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 2.0


@dataclass
class Tracked:
    """One process we started (or learnt about, e.g. a shim daemon that double-forked)."""

    pid: int
    role: str
    label: str = ""
    pgid: int | None = None  # set when the process leads its own group: the group is killed
    start_ticks: int | None = None  # /proc/PID/stat field 22, guards against pid reuse
    # first signal of cleanup(); SIGKILL for processes that ignore SIGTERM (the runc shim
    # does while it holds containers) so cleanup does not wait the grace period for nothing
    stop_signal: int = signal.SIGTERM
    registered_ns: int = field(default_factory=time.monotonic_ns)

    def alive(self) -> bool:
        if _pid_alive(self.pid, self.start_ticks):
            return True
        return self.pgid is not None and bool(_group_members(self.pgid))


@dataclass
class Finalizer:
    """An undo action run by `cleanup()` after the kills (e.g. `runc delete --force ID`)."""

    token: int
    label: str
    fn: Callable[[], Any]


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, start_ticks) of a pid, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[2]), int(rest[19])


def process_start_ticks(pid: int) -> int | None:
    st = _read_stat(pid)
    return st[2] if st else None


def _pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    st = _read_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start_ticks is None or st[2] == start_ticks


def _all_pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def _group_members(pgid: int) -> list[int]:
    out = []
    for pid in _all_pids():
        st = _read_stat(pid)
        if st and st[1] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


class ProcessRegistry:
    """Thread-safe record of live child processes and pending finalizers."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._procs: dict[int, Tracked] = {}
        self._finalizers: dict[int, Finalizer] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.RLock()
        self._atexit = False

    # -- recording -------------------------------------------------------------------------
    def register(self, pid: int, role: str, label: str = "", *, group: bool = False,
                 pgid: int | None = None, stop_signal: int = signal.SIGTERM) -> Tracked:
        """Track `pid`; `group=True` means it leads its own process group (kill the group)."""
        if group and pgid is None:
            pgid = pid
        t = Tracked(pid=pid, role=role, label=label, pgid=pgid,
                    start_ticks=process_start_ticks(pid), stop_signal=stop_signal)
        with self._lock:
            self._procs[pid] = t
            self._ensure_atexit()
        return t

    def unregister(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)

    def add_finalizer(self, label: str, fn: Callable[[], Any]) -> int:
        """Run `fn()` (synchronous) at cleanup unless `release(token)` is called first."""
        with self._lock:
            tok = next(self._tokens)
            self._finalizers[tok] = Finalizer(tok, label, fn)
            self._ensure_atexit()
        return tok

    def release(self, token: int | None) -> None:
        if token is None:
            return
        with self._lock:
            self._finalizers.pop(token, None)

    def tracked(self) -> list[Tracked]:
        with self._lock:
            return list(self._procs.values())

    def finalizers(self) -> list[Finalizer]:
        with self._lock:
            return list(self._finalizers.values())

    def leftovers(self) -> list[Tracked]:
        """Tracked entries still alive (tests assert this is empty)."""
        return [t for t in self.tracked() if t.alive()]

    def _ensure_atexit(self) -> None:
        if not self._atexit:
            atexit.register(self.cleanup)
            self._atexit = True

    # -- cleanup ---------------------------------------------------------------------------
    def cleanup(self, grace: float = DEFAULT_GRACE_S) -> list[int]:
        """Kill every live tracked process/group, run finalizers; returns the pids signalled."""
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
            fins = sorted(self._finalizers.values(), key=lambda f: -f.token)
            self._finalizers.clear()
        live = [t for t in procs if t.alive()]
        for t in live:
            _signal(t, t.stop_signal)
        if all(t.stop_signal == signal.SIGKILL for t in live):
            grace = 0.0
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(t.alive() for t in live):
            time.sleep(0.01)
        for t in live:
            if t.alive():
                log.warning("registry %s: SIGKILL %s %s pid %d", self.name, t.role, t.label, t.pid)
                _signal(t, signal.SIGKILL)
        for t in live:
            _wait_gone(t, 2.0)
        for f in fins:
            try:
                f.fn()
            except Exception as exc:  # a failed undo must not stop the others
                log.warning("registry %s: finalizer %s failed: %s", self.name, f.label, exc)
        return [t.pid for t in live]

    # -- spawning --------------------------------------------------------------------------
    async def spawn(self, *argv: str, role: str, label: str = "", new_group: bool = True,
                    **kwargs: Any) -> asyncio.subprocess.Process:
        """`asyncio.create_subprocess_exec` + register; `new_group` puts it in its own session so
        a terminal Ctrl-C does not hit it before we clean up in order."""
        if new_group:
            kwargs.setdefault("start_new_session", True)
        proc = await asyncio.create_subprocess_exec(*argv, **kwargs)
        self.register(proc.pid, role, label, group=bool(kwargs.get("start_new_session")))
        return proc

    async def run(self, *argv: str, role: str, label: str = "", timeout: float | None = None,
                  input: bytes | None = None, **kwargs: Any) -> tuple[int, bytes, bytes]:
        """Spawn, wait (killing on timeout/cancel), unregister; returns (rc, stdout, stderr)."""
        kwargs.setdefault("stdin", asyncio.subprocess.PIPE if input is not None
                          else asyncio.subprocess.DEVNULL)
        kwargs.setdefault("stdout", asyncio.subprocess.PIPE)
        kwargs.setdefault("stderr", asyncio.subprocess.PIPE)
        proc = await self.spawn(*argv, role=role, label=label, **kwargs)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except BaseException:
            if proc.returncode is None:
                _signal(Tracked(proc.pid, role, label, pgid=proc.pid
                                if kwargs.get("start_new_session") else None), signal.SIGKILL)
                try:
                    await asyncio.shield(proc.wait())
                except BaseException:
                    pass
            raise
        finally:
            self.unregister(proc.pid)
        return proc.returncode if proc.returncode is not None else -1, out or b"", err or b""


def _signal(t: Tracked, sig: int) -> None:
    try:
        if t.pgid is not None:
            os.killpg(t.pgid, sig)
        elif _pid_alive(t.pid, t.start_ticks):
            os.kill(t.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    # a leader that left its group (or a group that is gone) still gets the direct signal
    if t.pgid is not None and _pid_alive(t.pid, t.start_ticks):
        try:
            os.kill(t.pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(t: Tracked, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while t.alive() and time.monotonic() < deadline:
        time.sleep(0.005)


REGISTRY = ProcessRegistry()


def default_registry() -> ProcessRegistry:
    return REGISTRY


def leftovers() -> list[Tracked]:
    return REGISTRY.leftovers()


def cleanup(grace: float = DEFAULT_GRACE_S) -> list[int]:
    return REGISTRY.cleanup(grace)


def stop_popen(proc: "subprocess.Popen[Any]", sig: int = signal.SIGTERM, timeout: float = 30.0,
               registry: ProcessRegistry | None = None) -> int | None:
    """Signal a tracked child, wait for it (SIGKILL after `timeout`), reap it and untrack it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    (registry or REGISTRY).unregister(proc.pid)
    return proc.returncode


def install_signal_handlers(registry: ProcessRegistry | None = None,
                            signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """On SIGINT/SIGTERM: clean the registry, then die as the signal would have us die
    (KeyboardInterrupt for SIGINT, SystemExit(128+n) otherwise).  Main thread only.

    An asyncio program that wants a graceful shutdown should rather use
    `loop.add_signal_handler` and call `cleanup()` itself; this is the fallback for plain CLIs.
    """
    reg = registry or REGISTRY

    def handler(signum: int, _frame: Any) -> None:
        for s in signals:  # a second Ctrl-C during cleanup must not interrupt it
            signal.signal(s, signal.SIG_IGN)
        try:
            reg.cleanup()
        finally:
            for s in signals:
                signal.signal(s, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    for s in signals:
        signal.signal(s, handler)


# -- stray processes ---------------------------------------------------------------------------
@dataclass
class ProcInfo:
    pid: int
    exe: str
    cmdline: list[str]
    cwd: str


def _proc_info(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return None
    exe = cwd = ""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pass
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        pass
    return ProcInfo(pid, exe, cmd, cwd)


def find_processes(*, under: str | os.PathLike[str] | None = None,
                   names: Sequence[str] = (), cmdline_contains: Sequence[str] = (),
                   cgroup_contains: str | None = None) -> list[ProcInfo]:
    """Live processes (not zombies, not us) matching every given criterion:
    `under` — cwd below the dir or an argument mentioning it; `names` — basename of the
    executable or argv[0] is one of them; `cmdline_contains` — all substrings occur in the joined
    argv; `cgroup_contains` — /proc/PID/cgroup mentions it (finds container processes, whose cwd
    and root are inside another mount namespace)."""
    root = os.path.realpath(under) if under is not None else None
    me = os.getpid()
    out: list[ProcInfo] = []
    for pid in _all_pids():
        if pid == me:
            continue
        st = _read_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        info = _proc_info(pid)
        if info is None or not (info.cmdline or info.exe):
            continue  # kernel threads
        joined = " ".join(info.cmdline)
        if names:
            bases = {os.path.basename(info.exe).removesuffix(" (deleted)"),
                     os.path.basename(info.cmdline[0]) if info.cmdline else ""}
            if not bases & set(names):
                continue
        if any(s not in joined for s in cmdline_contains):
            continue
        if root is not None:
            in_cwd = info.cwd == root or info.cwd.startswith(root + "/")
            if not in_cwd and root not in joined:
                continue
        if cgroup_contains is not None:
            try:
                with open(f"/proc/{pid}/cgroup") as fh:
                    if cgroup_contains not in fh.read():
                        continue
            except OSError:
                continue
        out.append(info)
    return out


# -- mounts and trees --------------------------------------------------------------------------
def unescape_mount(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts_below(path: str | os.PathLike[str], *, include_self: bool = True) -> list[str]:
    """Mount points at or below `path` in our mount namespace, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = unescape_mount(line.split()[4])
            if (include_self and mp == root) or mp.startswith(root.rstrip("/") + "/"):
                found.append(mp)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


_libc: Any = None
MNT_DETACH = 2


def _umount(target: str, flags: int = 0) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_below(path: str | os.PathLike[str], *, include_self: bool = True,
                  lazy_fallback: bool = True) -> list[str]:
    """Unmount everything at/below `path` (deepest first; stacked mounts repeatedly)."""
    done: list[str] = []
    for _ in range(64):  # stacked mounts on one point need several passes
        mps = mounts_below(path, include_self=include_self)
        if not mps:
            return done
        for mp in mps:
            try:
                _umount(mp)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):
                    continue
                if exc.errno == errno.EBUSY and lazy_fallback:
                    _umount(mp, MNT_DETACH)
                else:
                    raise
            done.append(mp)
    raise OSError(errno.EBUSY, f"mounts below {path} keep reappearing")


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Unmount below `path`, then delete it; refuses / and other top-level directories."""
    p = Path(os.path.realpath(path))
    if len(p.parts) < 3:
        raise ValueError(f"refusing to remove {p}: too close to /")
    if not p.exists() and not p.is_symlink():
        return
    unmount_below(p)
    if mounts_below(p):
        raise OSError(errno.EBUSY, f"{p} still has mounts: {mounts_below(p)}")
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
