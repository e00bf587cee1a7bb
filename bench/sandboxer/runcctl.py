"""Owns: the sandboxer's calls to the `runc` binary (create/start/kill/delete/state/ps/pause).

Private and minimal until bench/runtimes/runc.py settles; every call is one short-lived runc
process.  Container stdio must not be a pipe we read (the container would keep it open), so
`create` hands the container its stdio fds directly and takes runc's own errors from `--log`.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from bench import offloop

RUNC = os.environ.get("CHAINBENCH_RUNC") or shutil.which("runc") or "runc"


class RuncError(RuntimeError):
    def __init__(self, args: list[str], message: str) -> None:
        self.args_ = args
        self.message = message.strip()
        super().__init__(f"runc {' '.join(args[:1])}: {self.message}")

    @property
    def not_found(self) -> bool:
        m = self.message.lower()
        return "does not exist" in m or "not exist" in m or "no such file" in m


@dataclass(frozen=True)
class Runc:
    root: str

    async def _run(self, *args: str, stdin: Any = None, stdout: Any = None,
                   stderr: Any = None, log: str | None = None) -> bytes:
        argv = [RUNC, "--root", self.root]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        argv += list(args)
        capture = stdout is None
        # Forked and waited for in a worker thread (bench.offloop): the sandboxer's loop goes on
        # serving other pods' calls, as a tokio runtime's other workers do.
        proc = await offloop.popen(
            argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else stdout,
            stderr=subprocess.PIPE if stderr is None else stderr)
        try:
            out, err = await offloop.communicate(proc)
        except asyncio.CancelledError:
            # runc finishes on its own (its work is bounded); reap it rather than leave a zombie
            await asyncio.shield(offloop.wait(proc))
            raise
        if proc.returncode != 0:
            msg = err.decode(errors="replace")
            if log:
                msg = _last_log_error(log) or msg
            raise RuncError(list(args), msg or f"exit status {proc.returncode}")
        return out

    async def create(self, cid: str, bundle: str, pid_file: str, log: str,
                     stdio: tuple[int, int, int]) -> None:
        await self._run("create", "--bundle", bundle, "--pid-file", pid_file, cid,
                        stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], log=log)

    async def start(self, cid: str) -> None:
        await self._run("start", cid)

    async def kill(self, cid: str, sig: int, all_: bool = False) -> None:
        args = ["kill"] + (["--all"] if all_ else []) + [cid, str(sig)]
        await self._run(*args)

    async def delete(self, cid: str, force: bool = False) -> None:
        await self._run("delete", *(["--force"] if force else []), cid)

    async def state(self, cid: str) -> dict[str, Any]:
        return json.loads(await self._run("state", cid))

    async def ps(self, cid: str) -> list[int]:
        out = await self._run("ps", "--format", "json", cid)
        return [int(p) for p in (json.loads(out) or [])]

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid)

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid)

    async def exec_detached(self, cid: str, process_json: str, pid_file: str, log: str,
                            stdio: tuple[int, int, int]) -> None:
        await self._run("exec", "--detach", "--process", process_json, "--pid-file", pid_file,
                        cid, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], log=log)


def _last_log_error(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("level") in ("error", "fatal"):
            return str(rec.get("msg", ""))
    return ""
