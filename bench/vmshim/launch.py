"""Owns: the shim's `start` and `delete` actions (wire-contracts §4.2), its socket path and the
state file the daemon keeps in the bundle so that `delete` can clean up after a dead daemon.

start: bind the ttrpc socket (mode 0600) at `<dir>/s/<sha256(address/ns/id)>`, spawn the daemon
in a new session with the listening socket as fd 3, a readiness pipe as fd 4 and, when the bundle
has a `log` FIFO with a reader, that FIFO as stderr; wait until the daemon serves (so a shim that
cannot start fails here, with its message, instead of at the first call), write `address` into
the bundle, print `unix://<socket>`.  If the socket already answers, just print it again: like
the runc shim, a container whose spec names its pod (`io.kubernetes.cri.sandbox-id`) shares the
pod's shim.

delete: kill the daemon and the VM recorded in `<bundle>/vmshim-state.json` (pid + start time,
so a reused pid is never hit), remove the socket and the VM work dir, print a raw
`containerd.task.v2.DeleteResponse` (exit status 137 = killed, like the runc shim).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.sockets import socket_answers
from bench.runtimes.oci import SpecError, validate_id
from bench.vmshim.main import SHIM_NAME, Flags

DEFAULT_DIR = "/run/chainbench/vmshim"
STATE_FILE = "vmshim-state.json"
ADDRESS_FILE = "address"
LOG_FIFO = "log"
READY_FD = 4
LISTEN_FD = 3
_READY_TIMEOUT_S = float(os.environ.get("CHAINBENCH_VMSHIM_START_TIMEOUT", "20"))
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


class ShimFailure(RuntimeError):
    """An action failed; the message goes to stderr and the exit status is 1."""


def runtime_dir() -> Path:
    return Path(os.environ.get("CHAINBENCH_VMSHIM_DIR") or DEFAULT_DIR)


def socket_path(address: str, namespace: str, id_: str, root: Path | None = None) -> str:
    # Same derivation as containerd's shims: one socket per (engine address, namespace, id).
    digest = hashlib.sha256(os.path.join(address, namespace, id_).encode()).hexdigest()
    path = str((root or runtime_dir()) / "s" / digest)
    if len(path.encode()) > _SUN_PATH_MAX:
        raise ShimFailure(f"socket path {path} is longer than {_SUN_PATH_MAX} bytes; "
                          "set CHAINBENCH_VMSHIM_DIR to a shorter directory")
    return path


def vm_workdir(address: str, namespace: str, id_: str) -> Path:
    """Per-pod directory for the VM's sockets; short, because unix socket paths are."""
    digest = hashlib.sha256(os.path.join(address, namespace, id_).encode()).hexdigest()[:20]
    return runtime_dir() / "vm" / digest


def _check(flags: Flags) -> None:
    try:
        validate_id(flags.id, "shim id")
    except SpecError as exc:
        raise ShimFailure(str(exc)) from None
    if not flags.namespace:
        raise ShimFailure("-namespace is required")
    try:
        validate_id(flags.namespace, "namespace")
    except SpecError as exc:
        raise ShimFailure(str(exc)) from None


def _group_of(id_: str) -> str:
    """The pod a container belongs to, from the spec's annotations in the bundle (cwd) — the
    way containerd's CRI plugin groups a pod's containers into its sandbox's shim."""
    try:
        with open("config.json", "rb") as fh:
            annotations = json.load(fh).get("annotations") or {}
    except (OSError, ValueError, AttributeError):
        return id_
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key) if isinstance(annotations, dict) else None
        if isinstance(value, str) and value:
            try:
                return validate_id(value, f"annotation {key}")
            except SpecError as exc:
                raise ShimFailure(str(exc)) from None
    return id_


def _open_log() -> int | None:
    """The bundle's `log` FIFO, write-only, if a reader holds it (else None: no log)."""
    try:
        fd = os.open(LOG_FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    # A reader exists; blocking writes from now on, so a slow reader never loses our log.
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    return fd


def daemon_argv(flags: Flags) -> list[str]:
    # started through the wrapper (-S, PYTHONPATH set): the daemon can skip `site` as well
    argv = [sys.executable, "-Sm" if sys.flags.no_site else "-m", "bench.vmshim",
            "-namespace", flags.namespace,
            "-id", flags.id, "-address", flags.address]
    if flags.publish_binary:
        argv += ["-publish-binary", flags.publish_binary]
    if flags.trace_dir:
        argv += ["-trace-dir", flags.trace_dir]
    if flags.debug:
        argv.append("-debug")
    return argv


def action_start(flags: Flags) -> int:
    _check(flags)
    bundle = os.path.realpath(flags.bundle or os.getcwd())
    if bundle != os.path.realpath(os.getcwd()):
        os.chdir(bundle)  # the daemon runs in the bundle, as the runc shim's does
    group = _group_of(flags.id)
    path = flags.socket or socket_path(flags.address, flags.namespace, group)
    address = f"unix://{path}"
    if os.path.exists(path):
        if socket_answers(path):
            _write_address(address)
            print(address, flush=True)
            return 0
        os.unlink(path)  # a dead shim's leftover
    if group != flags.id:
        # a container of a pod whose shim is gone: only the sandbox's start may make a VM
        raise ShimFailure(f"the shim of sandbox {group} (for container {flags.id}) is not "
                          "running")
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # born 0600: no window where others may connect
        try:
            listener.bind(path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and socket_answers(path):
                # another `start` for the same id won the race: share its daemon
                _write_address(address)
                print(address, flush=True)
                return 0
            raise ShimFailure(f"cannot bind {path}: {exc}") from None
        finally:
            os.umask(old_umask)
        listener.listen(128)
        try:
            _spawn_daemon(flags, listener)
        except BaseException:
            _unlink(path)
            raise
    finally:
        listener.close()
    _write_address(address)
    print(address, flush=True)
    return 0


def _spawn_daemon(flags: Flags, listener: socket.socket) -> int:
    # Move both fds above the target numbers first: a dup2 onto an fd that is also a source
    # would clobber it.
    lfd = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    rfd, wfd0 = os.pipe()
    wfd = fcntl.fcntl(wfd0, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(wfd0)
    logfd = _open_log()
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        # stdout must not be the caller's pipe: it reads our stdout to EOF
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, logfd, 2) if logfd is not None
        else (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, lfd, LISTEN_FD),
        (os.POSIX_SPAWN_DUP2, wfd, READY_FD),
    ]
    try:
        try:
            pid = os.posix_spawn(sys.executable, daemon_argv(flags), dict(os.environ),
                                 file_actions=actions, setsid=True)
        except OSError as exc:
            raise ShimFailure(f"cannot spawn the shim daemon: {exc}") from None
    finally:
        os.close(lfd)
        os.close(wfd)
        if logfd is not None:
            os.close(logfd)
    try:
        msg = _read_ready(rfd, _READY_TIMEOUT_S)
    finally:
        os.close(rfd)
    if msg != "ok":
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise ShimFailure(msg or "the shim daemon exited during startup "
                                 "(its stderr goes to the bundle's log FIFO)")
    return pid


def _read_ready(fd: int, timeout: float) -> str:
    """The daemon writes 'ok\\n' once it serves, or 'error: ...\\n'; EOF = it died."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"the shim daemon did not become ready within {timeout:g}s"
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace").strip().removeprefix("error: ")


def _write_address(address: str) -> None:
    tmp = f".{ADDRESS_FILE}.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(address)
    os.replace(tmp, ADDRESS_FILE)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- state file ------------------------------------------------------------------------------
def write_state(bundle: str | os.PathLike[str], state: dict[str, Any]) -> None:
    p = Path(bundle) / STATE_FILE
    tmp = p.with_name(f".{STATE_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, p)


def read_state(bundle: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(bundle) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_state(bundle: str | os.PathLike[str]) -> None:
    _unlink(str(Path(bundle) / STATE_FILE))


def _stat(pid: int) -> tuple[bytes, int] | None:
    # bench.processes has the same reader, but importing it pulls asyncio into every
    # `start`/`delete`, a fresh interpreter each time
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2:].split()
    return rest[0], int(rest[19])


def start_ticks(pid: int) -> int | None:
    st = _stat(pid)
    return st[1] if st else None


def alive(pid: int, ticks: int | None) -> bool:
    """`pid` runs, is not a zombie and is still the process that had start time `ticks`."""
    st = _stat(pid) if pid > 0 else None
    return st is not None and st[0] not in (b"Z", b"X") and ticks is not None \
        and st[1] == ticks


def _wait_dead(pid: int, ticks: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, ticks):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def stop_process(pid: int, ticks: int | None, *, pgid: int | None = None,
                 graceful: bool = False, grace: float = 2.0) -> None:
    """Kill a recorded process (and its group when it leads one); `graceful` sends SIGTERM
    first and waits `grace` (the host-run agent kills its own children on SIGTERM)."""
    if not alive(pid, ticks):
        return

    def send(sig: int) -> None:
        try:
            if pgid:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    if graceful:
        send(signal.SIGTERM)
        if _wait_dead(pid, ticks, grace):
            return
    send(signal.SIGKILL)
    _wait_dead(pid, ticks, 5.0)


def cleanup_from_state(state: dict[str, Any], *, kill_daemon: bool = True) -> None:
    """Stop whatever the state file says still runs; remove the socket and the VM work dir."""
    if kill_daemon and state.get("pid") != os.getpid():
        stop_process(int(state.get("pid") or 0), state.get("ticks"))
    vm = state.get("vm") or {}
    if vm:
        stop_process(int(vm.get("pid") or 0), vm.get("ticks"), pgid=vm.get("pgid"),
                     graceful=vm.get("stop") == "term")
        wd = vm.get("workdir")
        if wd and Path(wd).is_relative_to(runtime_dir()):
            shutil.rmtree(wd, ignore_errors=True)
    sock = state.get("socket")
    if sock and not socket_answers(sock):
        _unlink(sock)


def action_delete(flags: Flags) -> int:
    _check(flags)
    bundle = os.path.realpath(flags.bundle or os.getcwd())
    task_pid = 0
    state = read_state(bundle)
    if state is not None and state.get("id") == flags.id:
        cleanup_from_state(state)
        task_pid = int(state.get("task_pid") or 0)
        remove_state(bundle)
    # no state (daemon never got that far, or a container bundle): the socket may still linger
    path = flags.socket or socket_path(flags.address, flags.namespace, flags.id)
    if os.path.exists(path) and not socket_answers(path):
        _unlink(path)
    from bench.rpc.pb import task_v2_pb2

    resp = task_v2_pb2.DeleteResponse(pid=task_pid, exit_status=128 + signal.SIGKILL)
    resp.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


__all__ = ["SHIM_NAME", "ShimFailure", "action_delete", "action_start", "socket_path",
           "vm_workdir", "runtime_dir", "read_state", "write_state", "cleanup_from_state"]
