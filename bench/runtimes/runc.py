"""Owns: the async wrapper around the `runc` binary (create/start/run/state/kill/delete/ps/list).

Every runc invocation is tracked in the process registry while it runs, and every container we
create gets a registry finalizer (`runc delete --force`) until we delete it, so a crash or Ctrl-C
never leaves a container, its cgroup or its state dir behind.

`create`/`run -d` hand runc's stdio to the container init, so they must not be pipes we wait on:
the container gets /dev/null (or the files the caller names) and runc's own errors are read from
a per-call `--log` file (JSON lines) instead of stderr.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal as _signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

from bench.processes import REGISTRY, ProcessRegistry
from bench.runtimes.oci import validate_id

DEFAULT_ROOT = "/run/chainbench/runc"
Stdio = Union[None, int, str]  # /dev/null, an fd the container inherits, or a file to append to


class RuncError(RuntimeError):
    """A runc command failed; `stderr` holds runc's message."""

    def __init__(self, verb: str, argv: list[str], returncode: int, stderr: str) -> None:
        self.verb = verb
        self.argv = argv
        self.returncode = returncode
        self.stderr = _clean_stderr(stderr)
        super().__init__(f"runc {verb} failed (rc={returncode}): {self.stderr}")

    @property
    def not_found(self) -> bool:
        s = self.stderr.lower()
        return "does not exist" in s or "not exist" in s or "no such file" in s


@dataclass
class Runc:
    """One runc state root. `registry=None` uses the module-level process registry.

    track_containers: give every created container a registry finalizer (`runc delete
    --force` at exit/cleanup).  Turn it off in a long-lived daemon whose containers must
    survive its restart (the sandboxer recovers them instead)."""

    binary: str = "runc"
    root: str = DEFAULT_ROOT
    registry: ProcessRegistry | None = None
    timeout: float = 30.0
    systemd_cgroup: bool = False
    track_containers: bool = True
    _finalizers: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        os.makedirs(self.root, mode=0o711, exist_ok=True)

    @property
    def _reg(self) -> ProcessRegistry:
        return self.registry or REGISTRY

    def _base(self) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv

    async def _exec(self, *args: str, label: str = "", timeout: float | None = None) -> bytes:
        argv = self._base() + list(args)
        rc, out, err = await self._reg.run(*argv, role="runc", label=label,
                                           timeout=timeout or self.timeout, new_group=False)
        if rc != 0:
            raise RuncError(args[0], argv, rc, err.decode("utf-8", "replace"))
        return out

    async def _exec_detached(self, verb_args: list[str], cid: str, stdin: Stdio,
                             stdout: Stdio, stderr: Stdio) -> None:
        """create / run -d / exec -d: the container process inherits runc's stdio, so it must
        not be a pipe we wait on; runc's own errors come from a per-call --log file."""
        fd, log_path = tempfile.mkstemp(prefix=f".log-{cid}-", suffix=".json", dir=self.root)
        os.close(fd)
        argv = self._base() + ["--log", log_path, "--log-format", "json"] + verb_args
        opened: list[Any] = []

        def _io(x: Stdio, mode: str) -> Any:
            if x is None:
                return asyncio.subprocess.DEVNULL
            if isinstance(x, int):
                return x
            f = open(x, mode)
            opened.append(f)
            return f

        try:
            out = _io(stdout, "ab")
            err = out if stderr is None and stdout is not None and not isinstance(stdout, int) \
                else _io(stderr, "ab")
            rc, _, _ = await self._reg.run(*argv, role="runc", label=cid, timeout=self.timeout,
                                           new_group=False, stdin=_io(stdin, "rb"),
                                           stdout=out, stderr=err)
            if rc != 0:
                raise RuncError(verb_args[0], argv, rc, _log_errors(log_path))
        finally:
            for f in opened:
                f.close()
            try:
                os.unlink(log_path)
            except FileNotFoundError:
                pass

    def _track(self, cid: str) -> None:
        if self.track_containers and cid not in self._finalizers:
            self._finalizers[cid] = self._reg.add_finalizer(
                f"runc container {cid}", lambda: self.delete_sync(cid))

    def _untrack(self, cid: str) -> None:
        self._reg.release(self._finalizers.pop(cid, None))

    # -- lifecycle ---------------------------------------------------------------------------
    async def create(self, cid: str, bundle: str | os.PathLike[str], *,
                     pid_file: str | None = None, stdin: Stdio = None, stdout: Stdio = None,
                     stderr: Stdio = None) -> int:
        """`runc create`; returns the container init pid (stopped before the user process).
        stdio: None = /dev/null, an int fd (e.g. a FIFO end), or a file path (appended; stderr
        defaults to the stdout file)."""
        validate_id(cid, "container id")
        bundle = os.fspath(bundle)
        pid_file = pid_file or os.path.join(bundle, "runc.pid")
        self._track(cid)  # before: a create killed halfway still leaves state to delete
        try:
            await self._exec_detached(["create", "--bundle", bundle, "--pid-file", pid_file, cid],
                                      cid, stdin, stdout, stderr)
        except BaseException:
            await asyncio.shield(self._delete_quiet(cid))
            raise
        return _read_pid(pid_file)

    async def start(self, cid: str) -> None:
        validate_id(cid, "container id")
        await self._exec("start", cid, label=cid)

    async def run(self, cid: str, bundle: str | os.PathLike[str], *,
                  pid_file: str | None = None, stdin: Stdio = None, stdout: Stdio = None,
                  stderr: Stdio = None) -> int:
        """`runc run --detach`; returns the running container's pid."""
        validate_id(cid, "container id")
        bundle = os.fspath(bundle)
        pid_file = pid_file or os.path.join(bundle, "runc.pid")
        self._track(cid)
        try:
            await self._exec_detached(["run", "--detach", "--bundle", bundle, "--pid-file",
                                       pid_file, cid], cid, stdin, stdout, stderr)
        except BaseException:
            await asyncio.shield(self._delete_quiet(cid))
            raise
        return _read_pid(pid_file)

    async def exec(self, cid: str, process: Mapping[str, Any] | str, *, pid_file: str,
                   stdin: Stdio = None, stdout: Stdio = None, stderr: Stdio = None) -> int:
        """`runc exec --detach --process P`: `process` is an OCI process dict (written next to
        `pid_file`) or the path of one; returns the pid of the new process."""
        validate_id(cid, "container id")
        path = process if isinstance(process, str) else pid_file + ".process.json"
        if not isinstance(process, str):
            with open(path, "w") as fh:
                json.dump(dict(process), fh)
        try:
            await self._exec_detached(["exec", "--detach", "--process", path, "--pid-file",
                                       pid_file, cid], cid, stdin, stdout, stderr)
        finally:
            if not isinstance(process, str):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return _read_pid(pid_file)

    async def update(self, cid: str, resources: Mapping[str, Any]) -> None:
        """`runc update -r -`: apply OCI linux.resources (JSON on stdin)."""
        validate_id(cid, "container id")
        argv = self._base() + ["update", "--resources", "-", cid]
        rc, _, err = await self._reg.run(*argv, role="runc", label=cid, timeout=self.timeout,
                                         new_group=False, input=json.dumps(dict(resources))
                                         .encode())
        if rc != 0:
            raise RuncError("update", argv, rc, err.decode("utf-8", "replace"))

    async def stats(self, cid: str) -> dict[str, Any]:
        """`runc events --stats`: one JSON snapshot of the container's cgroup stats."""
        validate_id(cid, "container id")
        return json.loads(await self._exec("events", "--stats", cid, label=cid))

    async def state(self, cid: str) -> dict[str, Any]:
        """runc state JSON: id, pid, status (created|running|stopped|paused), bundle, ..."""
        validate_id(cid, "container id")
        return json.loads(await self._exec("state", cid, label=cid))

    async def kill(self, cid: str, sig: int = _signal.SIGTERM, *, all: bool = False) -> None:
        validate_id(cid, "container id")
        args = ["kill"] + (["--all"] if all else []) + [cid, str(int(sig))]
        await self._exec(*args, label=cid)

    async def delete(self, cid: str, *, force: bool = False) -> None:
        validate_id(cid, "container id")
        await self._exec("delete", *(["--force"] if force else []), cid, label=cid)
        self._untrack(cid)

    async def ps(self, cid: str) -> list[int]:
        validate_id(cid, "container id")
        return [int(p) for p in json.loads(await self._exec("ps", "--format", "json", cid,
                                                            label=cid)) or []]

    async def list(self) -> list[dict[str, Any]]:
        return json.loads(await self._exec("list", "--format", "json")) or []

    async def pause(self, cid: str) -> None:
        validate_id(cid, "container id")
        await self._exec("pause", cid, label=cid)

    async def resume(self, cid: str) -> None:
        validate_id(cid, "container id")
        await self._exec("resume", cid, label=cid)

    async def _delete_quiet(self, cid: str) -> None:
        try:
            await self.delete(cid, force=True)
        except RuncError as exc:
            if exc.not_found:
                self._untrack(cid)

    def delete_sync(self, cid: str) -> None:
        """Blocking `runc delete --force` for finalizers (no event loop needed)."""
        validate_id(cid, "container id")
        subprocess.run(self._base() + ["delete", "--force", cid], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        self._finalizers.pop(cid, None)


_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def _clean_stderr(text: str) -> str:
    """runc prints logrus lines (`time=... level=error msg="..."`): keep just the messages."""
    msgs = [m.group(1).replace('\\"', '"') for m in _LOGRUS_MSG.finditer(text)]
    return "; ".join(msgs) if msgs else text.strip()


def _log_errors(path: str) -> str:
    msgs = []
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                msgs.append(line)
                continue
            if rec.get("level") in ("error", "fatal", "panic"):
                msgs.append(str(rec.get("msg", "")))
    except FileNotFoundError:
        pass
    return "; ".join(m for m in msgs if m) or "no error message in runc log"


def _read_pid(path: str) -> int:
    with open(path) as fh:
        return int(fh.read().strip())
