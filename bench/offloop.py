"""Owns: short-lived child processes forked and waited for off the event loop.

CPython forks on the calling thread and keeps that thread until the child has exec'd (vfork,
or the CLOEXEC error pipe it reads); asyncio's subprocess support does this on the event loop's
thread.  In a daemon that starts a child per request — the engine a shim's `start` per pod, the
sandboxer runc per container — every other request then waits for each fork/exec: at runc-c10
the engine's loop stalled 15 ms median, 38 ms p90 per shim launch (shim.launch spans, with the
cores busy the child waits for one before it can exec).  The daemons these stand in for do not
stall like that (containerd forks in the goroutine of the request, Kuasar on a tokio worker, iSulad
in a request thread), so ours fork in worker threads and wait there too.  A synthetic check on
this kind of machine (20 shim launches with both cores busy): the loop's longest stall went
from ~210 ms to ~30 ms (the rest is the GIL), and the 20 launches took 60-76 ms instead of
200-208 ms.

Waiting also happens in the pool, so it is large: a blocked `communicate` costs a thread, not
CPU, and runc create under load takes hundreds of ms.
"""
from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="child")


def _kill(proc: subprocess.Popen[bytes], group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


async def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(argv, **kwargs)` in a worker thread.  Cancelled while it forks, the
    child is killed (its group with start_new_session) and reaped, never left behind."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_POOL, functools.partial(subprocess.Popen, list(argv), **kwargs))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        try:
            proc = await fut
        except Exception:
            raise asyncio.CancelledError() from None
        _kill(proc, bool(kwargs.get("start_new_session")))
        await loop.run_in_executor(_POOL, proc.wait)
        raise


async def communicate(proc: subprocess.Popen[bytes],
                      input: bytes | None = None) -> tuple[bytes, bytes]:
    """`proc.communicate(input)` in a worker thread (stdout, stderr; b"" when not piped).  A
    cancelled caller leaves the thread reading until the child ends: kill it, then `wait`."""
    loop = asyncio.get_running_loop()
    out, err = await loop.run_in_executor(_POOL, proc.communicate, input)
    return out or b"", err or b""


async def wait(proc: subprocess.Popen[bytes]) -> int:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, proc.wait)
