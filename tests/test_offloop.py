"""Children forked and waited for in worker threads (bench.offloop): output, errors, a loop that
keeps running meanwhile, and no child left behind when the caller is cancelled."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from bench import offloop


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_output_and_exit_status():
    async def main():
        code = "import sys; sys.stdout.write(sys.stdin.read()[::-1]); sys.exit(3)"
        p = await offloop.popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        out, err = await offloop.communicate(p, b"abc")
        return p.returncode, out, err
    assert asyncio.run(main()) == (3, b"cba", b"")


def test_a_missing_binary_raises_like_popen():
    async def main():
        await offloop.popen(["/nonexistent/chainbench-no-such-binary"])
    with pytest.raises(FileNotFoundError):
        asyncio.run(main())


def test_the_loop_runs_while_a_child_works():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.create_task(ticker())
        p = await offloop.popen(["sleep", "0.3"])
        await offloop.communicate(p)
        t.cancel()
        return ticks, p.returncode
    ticks, rc = asyncio.run(main())
    assert rc == 0 and ticks >= 3  # ~30 expected; the loop was never held for the child


def test_a_cancelled_wait_leaves_no_child_behind():
    async def main():
        p = await offloop.popen(["sleep", "30"], start_new_session=True)
        task = asyncio.create_task(offloop.communicate(p))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        os.killpg(p.pid, 9)  # what callers do on cancellation (start_shim)
        assert await offloop.wait(p) == -9
        return p.pid
    assert _gone(asyncio.run(main()))
