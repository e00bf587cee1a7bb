"""Owns: shim v2 process control for the real `containerd-shim-runc-v2` — the `start` and
`delete` binary protocol (wire-contracts §4.2), shim daemon tracking, cleanup and re-adoption.
The Events receiver (§4.1) lives in bench/runtimes/events.py and is re-exported here.

Start, as containerd 1.6 does it: `mkfifo <bundle>/log` and hold it open (the daemon exits at once
without it), run `<shim> -namespace NS -address A -publish-binary B -id ID start` in the bundle
with stdin=/dev/null and TTRPC_ADDRESS in the env, read the ttrpc address from stdout.  The
`start` process double-forks; the daemon (its own process group, cwd = bundle) is found by its
command line and tracked with role "shim" plus a registry finalizer that, should we die, kills it,
runs the `delete` action for every container still tracked and removes the socket.

The runc shim never removes its socket (/run/containerd/s/<sha256>) when killed, and `delete`
does not either: `ShimHandle.cleanup()` does.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import offloop
from bench.processes import REGISTRY, ProcessRegistry, Tracked, process_start_ticks
from bench.sockets import socket_answers
from bench.runtimes.events import EVENTS_SERVICE, EventReceiver, TaskEvent
from bench.runtimes.oci import validate_id

__all__ = ["EVENTS_SERVICE", "EventReceiver", "ShimConfig", "ShimError", "ShimHandle",
           "TaskEvent", "adopt_shim", "delete_shim", "find_shim_daemon", "remove_stale_socket",
           "start_shim"]

log = logging.getLogger(__name__)

DEFAULT_SHIM = "containerd-shim-runc-v2"
DEFAULT_NAMESPACE = "chainbench"
DEFAULT_PUBLISH_BINARY = "/usr/bin/containerd"
LOG_FIFO = "log"
_SCAN_AHEAD = 512  # pids after the `start` process searched before a full /proc scan


class ShimError(RuntimeError):
    """The shim binary failed (`start` or `delete`); `stderr` holds its message."""

    def __init__(self, action: str, message: str, returncode: int | None = None) -> None:
        self.action = action
        self.returncode = returncode
        self.stderr = message.strip()
        super().__init__(f"shim {action} failed"
                         + (f" (rc={returncode})" if returncode is not None else "")
                         + f": {self.stderr}")


@dataclass
class ShimConfig:
    """What every shim of one engine shares.  `address` stands for containerd's gRPC socket:
    the runc shim only hashes it (with namespace and id) into its socket path; `ttrpc_address`
    is where it publishes events (serve an `EventReceiver` there, or events are retried/lost)."""

    binary: str = DEFAULT_SHIM
    namespace: str = DEFAULT_NAMESPACE
    address: str = "/run/chainbench/engine.sock"
    ttrpc_address: str = "/run/chainbench/events.sock"
    publish_binary: str = DEFAULT_PUBLISH_BINARY
    debug: bool = False
    timeout: float = 10.0
    registry: ProcessRegistry | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def argv(self, cid: str, *tail: str) -> list[str]:
        a = [self.binary, "-namespace", self.namespace, "-address", self.address,
             "-publish-binary", self.publish_binary, "-id", cid]
        if self.debug:
            a.append("-debug")
        return a + list(tail)

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update({"TTRPC_ADDRESS": self.ttrpc_address, "GOMAXPROCS": "2"})
        e.update(self.extra_env)
        return e

    @property
    def reg(self) -> ProcessRegistry:
        return self.registry or REGISTRY


class _LogDrain:
    """Holds `<bundle>/log` open read-write (so the shim's open never blocks and never sees
    EOF) and copies what the daemon writes to a file, from the event loop."""

    def __init__(self, fifo: Path, out: Path | None) -> None:
        if not fifo.exists():
            os.mkfifo(fifo, 0o700)
        elif not stat.S_ISFIFO(fifo.stat().st_mode):
            raise ShimError("start", f"{fifo} exists and is not a FIFO")
        self.fd: int | None = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.out = open(out, "ab", buffering=0) if out else None
        self.loop: asyncio.AbstractEventLoop | None = None
        try:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.fd, self._readable)
        except RuntimeError:
            self.loop = None

    def _readable(self) -> None:
        if self.fd is None:
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if data and self.out is not None:
            self.out.write(data)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.remove_reader(fd)
            except (RuntimeError, ValueError):
                pass
        # whatever is still buffered belongs in the log
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                if self.out is not None:
                    self.out.write(data)
        except OSError:
            pass
        os.close(fd)
        if self.out is not None:
            self.out.close()
            self.out = None


@dataclass
class ShimHandle:
    """A running shim daemon started by `start_shim`."""

    id: str
    bundle: Path
    address: str  # as printed by the shim, e.g. unix:///run/containerd/s/<hash>
    pid: int  # the daemon (ConnectResponse.shim_pid gives the same number)
    config: ShimConfig
    log_path: Path | None = None
    start_s: float = 0.0  # wall time of the `start` action
    # perf_counter_ns before and after the fork/exec of `start` (until the child exec'd)
    launch_ns: tuple[int, int] = (0, 0)
    containers: dict[str, Path] = field(default_factory=dict)  # id -> bundle to `delete`
    _drain: _LogDrain | None = field(default=None, repr=False)
    _token: int | None = field(default=None, repr=False)
    _tracked: Tracked | None = field(default=None, repr=False)
    _cleaned: bool = field(default=False, repr=False)

    @property
    def socket_path(self) -> str:
        return socket_path_of(self.address)

    def alive(self) -> bool:
        return self._tracked.alive() if self._tracked else _pid_exists(self.pid)

    def track_container(self, cid: str, bundle: str | os.PathLike[str]) -> None:
        """Remember a container of this shim so cleanup runs the `delete` action for it."""
        validate_id(cid, "container id")
        self.containers[cid] = Path(bundle)

    def untrack_container(self, cid: str) -> None:
        """The container was deleted through the Task API: nothing left to clean for it."""
        self.containers.pop(cid, None)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._tracked and self._tracked.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    async def wait_exit(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def cleanup(self, *, grace: float = 0.5) -> list[Any]:
        """Make sure nothing of this shim survives: wait `grace` for it to exit (after a
        Shutdown; the runc shim ignores SIGTERM), else SIGKILL it; run `delete` for every
        still-tracked container (kills and removes it, unmounts its rootfs); remove the socket;
        stop the log drain.  Returns the DeleteResponses of the `delete` actions.  Idempotent."""
        if self._cleaned:
            return []
        results: list[Any] = []
        if not await self.wait_exit(grace):
            self.kill(signal.SIGKILL)
            await self.wait_exit(5.0)
        for cid, bundle in list(self.containers.items()):
            try:
                res = await delete_shim(self.config, cid, bundle)
                if res is not None:
                    results.append(res)
            except ShimError as exc:
                log.warning("shim delete %s: %s", cid, exc)
            self.containers.pop(cid, None)
        remove_stale_socket(self.socket_path)
        self._finish()
        return results

    def _finish(self) -> None:
        self._cleaned = True
        if self._drain is not None:
            self._drain.close()
        reg = self.config.reg
        reg.unregister(self.pid)
        reg.release(self._token)
        self._token = None

    def cleanup_sync(self) -> None:
        """Blocking variant of cleanup() for registry finalizers (no event loop)."""
        if self._cleaned:
            return
        self.kill(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        for cid, bundle in list(self.containers.items()):
            try:
                subprocess.run(self.config.argv(cid, "-bundle", str(bundle), "delete"),
                               cwd=bundle, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=self.config.env(), timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("shim delete %s: %s", cid, exc)
        self.containers.clear()
        remove_stale_socket(self.socket_path)
        self._finish()


def socket_path_of(address: str) -> str:
    for prefix in ("ttrpc+unix://", "unix://"):
        if address.startswith(prefix):
            return address[len(prefix):]
    return address


def _pid_exists(pid: int) -> bool:
    return process_start_ticks(pid) is not None


def remove_stale_socket(path: str) -> bool:
    """Remove a shim socket nobody listens on any more; True when it is gone."""
    if not path or path.startswith("\0") or not os.path.exists(path):
        return True
    if socket_answers(path):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


def _is_daemon(pid: int, cfg: ShimConfig, cid: str, bundle: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        if b"start" in argv or b"delete" in argv:
            return False
        want = [b"-namespace", cfg.namespace.encode(), b"-id", cid.encode()]
        if any(w not in argv for w in want):
            return False
        i = argv.index(b"-id")
        if argv[i + 1] != cid.encode():
            return False
        if os.readlink(f"/proc/{pid}/cwd") != bundle:
            return False
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1]) == pid  # not one of its threads
    except (OSError, ValueError, IndexError):
        return False
    return False


def find_shim_daemon(cfg: ShimConfig, cid: str, bundle: str | os.PathLike[str],
                     after_pid: int | None = None) -> int | None:
    """Pid of the shim daemon serving `cid` from `bundle` (cwd), or None."""
    b = os.path.realpath(bundle)
    if after_pid is not None:
        # new pids are handed out upwards: the daemon is a few pids after `start`
        for pid in range(after_pid + 1, after_pid + _SCAN_AHEAD):
            if os.path.exists(f"/proc/{pid}") and _is_daemon(pid, cfg, cid, b):
                return pid
    for name in os.listdir("/proc"):
        if name.isdigit() and _is_daemon(int(name), cfg, cid, b):
            return int(name)
    return None


def _kill_orphan_daemon(cfg: ShimConfig, cid: str, bundle: Path, start_pid: int) -> None:
    pid = find_shim_daemon(cfg, cid, bundle, after_pid=start_pid)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 2.0
        while _pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.002)
    try:
        address = (bundle / "address").read_text().strip()
    except OSError:
        return
    remove_stale_socket(socket_path_of(address))


async def start_shim(config: ShimConfig, id: str, bundle: str | os.PathLike[str], *,
                     log_path: str | os.PathLike[str] | None = "",
                     runtime_options: bytes | None = None) -> ShimHandle:
    """Run the shim `start` action for container/group `id` in `bundle` (must hold config.json).

    log_path: where the daemon's log goes ("" = <bundle>/shim.log, None = discarded).
    runtime_options: serialized google.protobuf.Any written to the shim's stdin (1.6 accepts
    runc Options there); default /dev/null.
    """
    validate_id(id, "shim id")
    b = Path(os.path.realpath(bundle))
    if not (b / "config.json").is_file():
        raise ShimError("start", f"bundle {b} has no config.json")
    out = (b / "shim.log") if log_path == "" else (Path(log_path) if log_path else None)
    drain = _LogDrain(b / LOG_FIFO, out)
    reg = config.reg
    t0 = time.perf_counter()
    try:
        launch0 = time.perf_counter_ns()
        # Forked in a worker thread (bench.offloop): the caller's loop serves other pods
        # meanwhile, as containerd's goroutines do.  Its own session: a terminal Ctrl-C does
        # not hit it before we clean up in order.
        proc = await offloop.popen(config.argv(id, "start"), cwd=str(b), env=config.env(),
                                   stdin=subprocess.PIPE if runtime_options is not None
                                   else subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        launch = (launch0, time.perf_counter_ns())
        reg.register(proc.pid, "shim-start", id, group=True)
        try:
            stdout, stderr = await asyncio.wait_for(offloop.communicate(proc, runtime_options),
                                                    config.timeout)
        except BaseException:
            # timed out or cancelled: `start` may already have forked the daemon
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: no one else in it
                except ProcessLookupError:
                    pass
                await asyncio.shield(offloop.wait(proc))
            _kill_orphan_daemon(config, id, b, proc.pid)
            raise
        finally:
            reg.unregister(proc.pid)
        start_s = time.perf_counter() - t0
        address = stdout.decode("utf-8", "replace").strip()
        if proc.returncode != 0 or not address:
            raise ShimError("start", stderr.decode("utf-8", "replace") or "no address printed",
                            proc.returncode)
        pid = find_shim_daemon(config, id, b, after_pid=proc.pid)
        if pid is None:
            # the daemon died right away (e.g. it could not open the log FIFO)
            remove_stale_socket(socket_path_of(address))
            raise ShimError("start", f"shim printed {address} but no daemon is running for {id}")
    except BaseException:
        drain.close()
        raise
    handle = ShimHandle(id=id, bundle=b, address=address, pid=pid, config=config,
                        log_path=out, start_s=start_s, launch_ns=launch, _drain=drain)
    handle._tracked = reg.register(pid, "shim", id, group=True, stop_signal=signal.SIGKILL)
    handle._token = reg.add_finalizer(f"shim {id}", handle.cleanup_sync)
    handle.track_container(id, b)
    return handle


async def adopt_shim(config: ShimConfig, id: str, bundle: str | os.PathLike[str], *,
                     log_path: str | os.PathLike[str] | None = "",
                     containers: dict[str, str | os.PathLike[str]] | None = None
                     ) -> ShimHandle | None:
    """Re-attach to a shim that outlived its engine (recovery after a restart): reads
    `<bundle>/address`, finds the daemon, re-opens the log FIFO and tracks it again.  Returns
    None when no daemon serves `id` any more (then call `delete_shim` for its containers).
    `containers` = {id: bundle} still to clean if it dies (default: just `id`)."""
    validate_id(id, "shim id")
    b = Path(os.path.realpath(bundle))
    try:
        address = (b / "address").read_text().strip()
    except FileNotFoundError:
        return None
    pid = find_shim_daemon(config, id, b)
    if pid is None or not address or not socket_answers(socket_path_of(address)):
        return None
    out = (b / "shim.log") if log_path == "" else (Path(log_path) if log_path else None)
    handle = ShimHandle(id=id, bundle=b, address=address, pid=pid, config=config, log_path=out,
                        _drain=_LogDrain(b / LOG_FIFO, out))
    reg = config.reg
    handle._tracked = reg.register(pid, "shim", id, group=True, stop_signal=signal.SIGKILL)
    handle._token = reg.add_finalizer(f"shim {id}", handle.cleanup_sync)
    for cid, cb in (containers if containers is not None else {id: b}).items():
        handle.track_container(cid, cb)
    return handle


async def delete_shim(config: ShimConfig, id: str, bundle: str | os.PathLike[str]) -> Any:
    """The shim `delete` action for container `id`: `runc delete --force`, unmount
    `<bundle>/rootfs`.  Returns the DeleteResponse (pid, exit_status 137, exited_at), or None
    when the shim never created that container (no `runtime` file in the bundle)."""
    from bench.rpc.pb import task_v2_pb2

    validate_id(id, "container id")
    b = Path(os.path.realpath(bundle))
    if not b.is_dir():
        return None
    rc, out, err = await config.reg.run(
        *config.argv(id, "-bundle", str(b), "delete"), role="shim-delete", label=id,
        cwd=str(b), env=config.env(), timeout=config.timeout + 20)
    if rc != 0:
        msg = err.decode("utf-8", "replace")
        if not (b / "runtime").exists() and "runtime" in msg:
            return None  # never created: nothing for runc to delete
        raise ShimError("delete", msg, rc)
    try:
        return task_v2_pb2.DeleteResponse.FromString(out)
    except Exception as exc:  # protobuf DecodeError
        raise ShimError("delete", f"undecodable DeleteResponse {out[:64]!r}: {exc}") from exc
