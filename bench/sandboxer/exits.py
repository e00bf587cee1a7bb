"""Owns: watching process exits with pidfds on the event loop (container inits, exec processes).

The sandboxer is a child subreaper, so a container init (or a detached exec process) is
re-parented to us once the `runc` call that made it exits; a pidfd per process wakes the loop
on exit and `waitid(P_PIDFD)` reaps it with its real status.  Processes re-attached after a
sandboxer restart are not our children: the pidfd still reports the exit, but the status is
unknowable and the callback gets None.  Only the pids we track are ever waited for, so asyncio's
own child watcher (the runc calls) is never disturbed.
"""
from __future__ import annotations

import asyncio
import os
import signal
from typing import Callable

OnExit = Callable[[int | None], None]  # exit status (128+signal when killed), None = unknown


class ExitWatcher:
    def __init__(self) -> None:
        # pidfd -> (owner key, callback); key lets a sandbox drop all its watches at once
        self._watch: dict[int, tuple[str, OnExit]] = {}
        self._by_pid: dict[int, int] = {}  # pid -> pidfd, for race-free signalling

    def watch(self, owner: str, pid: int, on_exit: OnExit) -> bool:
        """Call `on_exit` once `pid` exits; False (and no call) when it is already gone."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._watch[fd] = (owner, on_exit)
        self._by_pid[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._fired, fd, pid)
        return True

    def signal(self, pid: int, sig: int) -> bool:
        """Signal a watched process through its pidfd (no pid-reuse race); False if not live."""
        fd = self._by_pid.get(pid)
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        return True

    def _fired(self, fd: int, pid: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        entry = self._watch.pop(fd, None)
        if self._by_pid.get(pid) == fd:
            del self._by_pid[pid]
        status = None
        try:
            res = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            if res is not None:
                # killed or dumped: the shell convention, as containerd reports it
                status = res.si_status if res.si_code == os.CLD_EXITED else 128 + res.si_status
        except ChildProcessError:
            pass  # not our child (re-attached after a restart)
        finally:
            os.close(fd)
        if entry is not None:
            entry[1](status)

    def forget(self, owner: str | None = None) -> None:
        """Stop watching (all, or one owner's processes) without reaping anything."""
        loop = asyncio.get_running_loop()
        for fd, (o, _cb) in list(self._watch.items()):
            if owner is None or o == owner:
                loop.remove_reader(fd)
                os.close(fd)
                del self._watch[fd]
        live = set(self._watch)
        self._by_pid = {p: fd for p, fd in self._by_pid.items() if fd in live}
