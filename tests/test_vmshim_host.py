"""The microVM-flavor shim (bench.vmshim) as real processes: the shim v2 `start`/`delete`
protocol driven by the engine's own launcher (bench.runtimes.shimv2), Task calls relayed to the
real guest agent (bench.vm.agent) run on the host by the `host` VM backend, Shutdown, VM death,
and cleanup after a killed shim."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from bench import processes
from bench.rpc.pb import containerd_task_types_pb2 as types_pb
from bench.rpc.pb import task_v2_pb2
from bench.rpc.task_client import TaskClient
from bench.rpc.ttrpc import Code, TtrpcError
from bench.runtimes.shimv2 import (EventReceiver, ShimConfig, delete_shim, find_shim_daemon,
                                   start_shim)
from bench.tracing import read_spans
from bench.vmshim import launch
from bench.vmshim.main import SHIM_NAME, ensure_shim_binary

NS = "cbvm"


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _gone(pid: int) -> bool:
    st = launch._stat(pid)
    return st is None or st[0] in (b"Z", b"X")


async def _cmdline(pid: int) -> list[bytes]:
    # right after posix_spawn the child's argv can still read empty: the parent resumes
    # before the kernel has set up the new image's arg area
    for _ in range(500):
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
        if raw:
            return raw.split(b"\0")
        await asyncio.sleep(0.004)
    return []


async def _until(pred, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


class Env:
    """A short runtime dir (unix socket paths are limited to 107 bytes), a trace dir, the
    wrapper binary, and the ShimConfig the engine would use."""

    def __init__(self, tmp_path: Path, leak_check, backend: str = "host", boot: str = "cold"):
        self.root = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
        self.rt = self.root / "rt"
        self.trace = self.root / "trace"
        self.tmp = tmp_path
        self.binary = ensure_shim_binary(self.root / "bin")
        self.env = {"CHAINBENCH_VMSHIM_DIR": str(self.rt), "CHAINBENCH_TRACE_DIR": str(self.trace),
                    "CHAINBENCH_VM_BACKEND": backend, "CHAINBENCH_VM_BOOT": boot}
        self.cfg = ShimConfig(binary=str(self.binary), namespace=NS,
                              address=str(tmp_path / "engine.sock"),
                              ttrpc_address=str(tmp_path / "events.sock"), extra_env=self.env)
        leak_check.watch_dir(self.root)
        leak_check.watch_dir(tmp_path)

    def bundle(self, id_: str, process: dict | None = None, annotations: dict | None = None,
               vm_json: dict | None = None) -> Path:
        b = self.tmp / id_
        b.mkdir()
        spec = {"ociVersion": "1.0.2", "process": process or {"args": ["/pause"], "cwd": "/"},
                "root": {"path": "rootfs"}, "annotations": annotations or {}}
        (b / "config.json").write_text(json.dumps(spec))
        if vm_json is not None:
            (b / "vm.json").write_text(json.dumps(vm_json))
        return b

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], cwd=cwd, capture_output=True,
                              env={**os.environ, **self.env}, timeout=60)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def env(tmp_path, leak_check):
    e = Env(tmp_path, leak_check)
    yield e
    e.close()


def test_wrapper_binary_is_a_shim(env):
    assert env.binary.name == SHIM_NAME and os.access(env.binary, os.X_OK)
    assert ensure_shim_binary(env.binary.parent) == env.binary  # idempotent
    p = env.run("-v", cwd=env.tmp)
    assert p.returncode == 0 and SHIM_NAME in p.stdout.decode()


def test_start_protocol_connect_and_shutdown(env, leak_check):
    pod = _uid("pod")
    b = env.bundle(pod)

    async def main():
        shim = await start_shim(env.cfg, pod, b)
        try:
            sock = launch.socket_path(env.cfg.address, NS, pod, env.rt)
            leak_check.watch_socket(sock)
            assert shim.address == f"unix://{sock}"
            assert (b / "address").read_text() == shim.address
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            assert shim.alive() and find_shim_daemon(env.cfg, pod, b) == shim.pid
            assert [t.role for t in processes.leftovers() if t.pid == shim.pid] == ["shim"]
            state = launch.read_state(b)
            assert state["pid"] == shim.pid and state["socket"] == sock and state["vm"] is None

            # a second start for the same id finds the live shim and prints the same address
            again = env.run("-namespace", NS, "-address", env.cfg.address, "-publish-binary",
                            "x", "-id", pod, "start", cwd=b)
            assert again.returncode == 0 and again.stdout.decode().strip() == shim.address
            # so does a container whose spec names the pod, as containerd's CRI plugin does
            cb = env.bundle(_uid("ctr"), annotations={"io.kubernetes.cri.sandbox-id": pod})
            grouped = env.run("-namespace", NS, "-address", env.cfg.address, "-id", cb.name,
                              "start", cwd=cb)
            assert grouped.returncode == 0, grouped.stderr
            assert grouped.stdout.decode().strip() == shim.address

            client = await TaskClient.dial(shim.address, namespace=NS)
            conn = await client.connect(id=pod)
            assert conn.shim_pid == shim.pid and conn.task_pid == 0
            # no VM yet: task calls are NotFound, a container before its sandbox is refused
            with pytest.raises(TtrpcError) as ei:
                await client.state(id=pod)
            assert ei.value.code == Code.NOT_FOUND
            with pytest.raises(TtrpcError) as ei:
                await client.create(id="other", bundle=str(b))
            assert ei.value.code == Code.FAILED_PRECONDITION
            with pytest.raises(TtrpcError) as ei:
                await client.create(id="../evil", bundle=str(b))
            assert ei.value.code == Code.INVALID_ARGUMENT

            await client.shutdown(id=pod)
            assert await shim.wait_exit(10.0)
            await client.close()
            assert not os.path.exists(sock)
            assert launch.read_state(b) is None
            shim.untrack_container(pod)
            orphan = env.run("-namespace", NS, "-address", env.cfg.address, "-id", cb.name,
                             "start", cwd=cb)
            assert orphan.returncode == 1 and b"is not running" in orphan.stderr
            assert not os.path.exists(sock)
        finally:
            await shim.cleanup()

    asyncio.run(main())


def test_relay_pod_and_container_lifecycle(env, leak_check):
    pod, ctr = _uid("pod"), _uid("ctr")
    pb_ = env.bundle(pod)
    cb = env.bundle(ctr, process={"args": ["sleep", "300"], "cwd": "/",
                                  "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})

    async def main():
        events = await EventReceiver().start(env.cfg.ttrpc_address)
        shim = await start_shim(env.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        pids: list[int] = []
        try:
            client = await TaskClient.dial(shim.address, namespace=NS)
            created = await client.create(id=pod, bundle=str(pb_))
            assert created.pid == 0  # the agent spawns at Start
            vm = launch.read_state(pb_)["vm"]
            assert vm["pid"] > 0 and not _gone(vm["pid"]) and vm["stop"] == "term"
            started = await client.start(id=pod)
            pids.append(started.pid)
            st = await client.state(id=pod)
            assert st.status == types_pb.RUNNING and st.pid == started.pid
            assert st.bundle == str(pb_)
            # the guest's pause, not the bundle's /pause (the guest cannot see host bundles)
            assert (await _cmdline(started.pid))[0] == b"sleep"
            conn = await client.connect(id=pod)
            assert conn.shim_pid == shim.pid and conn.task_pid == started.pid
            assert launch.read_state(pb_)["task_pid"] == started.pid

            # a workload container: its process comes from its host bundle
            assert (await client.create(id=ctr, bundle=str(cb))).pid == 0
            c = await client.start(id=ctr)
            pids.append(c.pid)
            assert (await _cmdline(c.pid))[:2] == [b"sleep", b"300"]
            listed = await client.pids(id=ctr)
            assert [p.pid for p in listed.processes] == [c.pid]
            with pytest.raises(TtrpcError) as ei:  # agent errors come back unchanged
                await client.state(id="no-such-container")
            assert ei.value.code == Code.NOT_FOUND
            with pytest.raises(TtrpcError) as ei:
                await client.create(id=ctr, bundle=str(cb))
            assert ei.value.code == Code.ALREADY_EXISTS

            # Shutdown while tasks remain is a no-op, as with the runc shim
            await client.shutdown(id=pod)
            assert (await client.state(id=ctr)).status == types_pb.RUNNING

            waiter = asyncio.ensure_future(client.wait(id=ctr, timeout=30))
            await client.kill(id=ctr, signal=signal.SIGKILL)
            w = await waiter
            assert w.exit_status == 128 + signal.SIGKILL and w.exited_at.seconds > 0
            d = await client.delete(id=ctr)
            assert d.pid == c.pid and d.exit_status == 137
            await client.kill(id=pod, signal=signal.SIGTERM)
            assert (await client.wait(id=pod, timeout=30)).exit_status == 128 + signal.SIGTERM
            await client.delete(id=pod)
            shim.untrack_container(pod)

            await client.shutdown(id=pod)
            assert await shim.wait_exit(10.0)
            await client.close()
            assert await _until(lambda: _gone(vm["pid"]))
            assert not os.path.exists(shim.socket_path)
            assert not Path(vm["workdir"]).exists()

            # task events reached TTRPC_ADDRESS, as from containerd's shims
            ex = await events.wait_for("/tasks/exit", lambda e: e.message.container_id == ctr)
            assert ex.namespace == NS and ex.message.exit_status == 137
            assert ex.message.pid == c.pid and ex.message.id == ctr
            topics = [(e.topic, e.message.container_id) for e in events.history]
            for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"):
                assert (topic, pod) in topics and (topic, ctr) in topics
            assert all(e.peer_pid == shim.pid for e in events.history)
        finally:
            await shim.cleanup()
            await events.close()
        return pids

    pids = asyncio.run(main())
    assert all(_gone(p) for p in pids)
    spans = read_spans(env.trace)
    mine = [(s["call"], s["step"], s["component"]) for s in spans if s["pod"] == pod]
    assert mine == [("RunPodSandbox", "vm.boot", "vmm"), ("RunPodSandbox", "agent.ready", "shim"),
                    ("RunPodSandbox", "task.create", "shim"),
                    # the refused second Create counts too: failed steps are spans
                    ("CreateContainer", "task.create", "shim"),
                    ("CreateContainer", "task.create", "shim")]
    assert all(s["end_ns"] >= s["start_ns"] for s in spans)


def test_delete_action_after_killed_shim(env, leak_check):
    pod, ctr = _uid("kpod"), _uid("kctr")
    pb_ = env.bundle(pod)
    cb = env.bundle(ctr, process={"args": ["sleep", "300"]})

    async def main():
        shim = await start_shim(env.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            async with await TaskClient.dial(shim.address, namespace=NS) as client:
                await client.create(id=pod, bundle=str(pb_))
                p = await client.start(id=pod)
                shim.track_container(ctr, cb)
                await client.create(id=ctr, bundle=str(cb))
                c = await client.start(id=ctr)
            vm = launch.read_state(pb_)["vm"]
            shim.kill(signal.SIGKILL)  # the daemon only: the VM lives on, as a VMM would
            assert await shim.wait_exit(5.0)
            assert not _gone(vm["pid"]) and not _gone(p.pid)
            assert os.path.exists(shim.socket_path)

            res = await delete_shim(env.cfg, pod, pb_)
            assert isinstance(res, task_v2_pb2.DeleteResponse)
            assert res.pid == p.pid and res.exit_status == 137 and res.exited_at.seconds > 0
            assert await _until(lambda: _gone(vm["pid"]))
            assert await _until(lambda: _gone(p.pid) and _gone(c.pid))
            assert not os.path.exists(shim.socket_path)
            assert not Path(vm["workdir"]).exists() and launch.read_state(pb_) is None
            # a container bundle holds no shim state: delete still answers a DeleteResponse
            res = await delete_shim(env.cfg, ctr, cb)
            assert res.exit_status == 137 and res.pid == 0
            shim.untrack_container(ctr)
            # and deleting twice is harmless
            assert (await delete_shim(env.cfg, pod, pb_)).exit_status == 137
        finally:
            await shim.cleanup()

    asyncio.run(main())


def test_vm_death_ends_waits_and_the_shim(env, leak_check):
    pod = _uid("dpod")
    pb_ = env.bundle(pod)

    async def main():
        events = await EventReceiver().start(env.cfg.ttrpc_address)
        shim = await start_shim(env.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            client = await TaskClient.dial(shim.address, namespace=NS)
            await client.create(id=pod, bundle=str(pb_))
            p = await client.start(id=pod)
            vm = launch.read_state(pb_)["vm"]
            waiter = asyncio.ensure_future(client.wait(id=pod, timeout=30))
            await asyncio.sleep(0.1)
            assert not waiter.done()
            # the "VM" goes away (SIGTERM: the host agent takes its processes with it)
            os.kill(vm["pid"], signal.SIGTERM)
            w = await waiter
            assert w.exit_status == 255 and w.exited_at.seconds > 0
            assert await shim.wait_exit(10.0)
            await client.close()
            assert await _until(lambda: _gone(p.pid))
            assert not os.path.exists(shim.socket_path)
            # the engine then cleans up with the delete action, as for any dead shim
            res = await delete_shim(env.cfg, pod, pb_)
            assert res.exit_status == 137
            shim.untrack_container(pod)
            ex = await events.wait_for("/tasks/exit", lambda e: e.message.container_id == pod)
            assert ex.message.exit_status == 255 and ex.message.pid == p.pid
        finally:
            await shim.cleanup()
            await events.close()

    asyncio.run(main())


def test_bad_vm_config_is_invalid_argument_and_the_shim_survives(env, leak_check):
    pod = _uid("bpod")
    pb_ = env.bundle(pod, annotations={"io.chainbench.vm.backend": "firecracker"})

    async def main():
        shim = await start_shim(env.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            async with await TaskClient.dial(shim.address, namespace=NS) as client:
                with pytest.raises(TtrpcError) as ei:
                    await client.create(id=pod, bundle=str(pb_))
                assert ei.value.code == Code.INVALID_ARGUMENT
                assert "firecracker" in ei.value.message
                assert (await client.connect(id=pod)).shim_pid == shim.pid
                await client.shutdown(id=pod)
            assert await shim.wait_exit(10.0)
            shim.untrack_container(pod)
        finally:
            await shim.cleanup()

    asyncio.run(main())


def test_start_rejects_bad_input(env):
    b = env.bundle(_uid("e"))
    common = ["-namespace", NS, "-address", env.cfg.address, "-publish-binary", "x"]
    p = env.run(*common, "-id", "../../etc", "start", cwd=b)
    assert p.returncode == 1 and b"invalid shim id" in p.stderr and p.stdout == b""
    p = env.run(*common, "-id", "ok", "-bogus", "start", cwd=b)
    assert p.returncode == 2 and b"not defined: -bogus" in p.stderr
    p = env.run(*common, "-id", "ok", "explode", cwd=b)
    assert p.returncode == 2 and b"unknown action" in p.stderr
    assert not env.rt.joinpath("s").exists() or not any(env.rt.joinpath("s").iterdir())


def test_daemon_startup_failure_is_reported_by_start(env):
    """A daemon that cannot serve makes `start` fail with its message, leaving no socket."""
    b = env.bundle(_uid("f"))
    # the daemon "interpreter" is /bin/false: it dies before serving
    script = ("import sys; sys.executable = '/bin/false';"
              "from bench.vmshim.main import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", script, "-namespace", NS, "-address", "a",
                        "-id", "f1", "start"], cwd=b, capture_output=True,
                       env={**os.environ, **env.env}, timeout=60)
    assert p.returncode == 1 and b"exited during startup" in p.stderr and p.stdout == b""
    assert not any((env.rt / "s").iterdir())


def test_sigterm_stops_vm_and_daemon(env, leak_check):
    pod = _uid("tpod")
    pb_ = env.bundle(pod)

    async def main():
        shim = await start_shim(env.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            async with await TaskClient.dial(shim.address, namespace=NS) as client:
                await client.create(id=pod, bundle=str(pb_))
                p = await client.start(id=pod)
                vm = launch.read_state(pb_)["vm"]
                os.kill(shim.pid, signal.SIGTERM)
                assert await shim.wait_exit(10.0)
            assert _gone(vm["pid"]) and await _until(lambda: _gone(p.pid))
            assert not os.path.exists(shim.socket_path) and not Path(vm["workdir"]).exists()
            assert launch.read_state(pb_) is None
            shim.untrack_container(pod)
        finally:
            await shim.cleanup()

    asyncio.run(main())


def _probe_as_nobody(path: str) -> int:
    """Fork; the child drops to uid/gid 65534 and sends one ttrpc Connect on a raw socket.
    Exit 0 = the server closed the connection without answering, 1 = it answered."""
    from bench.rpc.pb import ttrpc_pb2
    from bench.rpc.ttrpc import HEADER, TYPE_REQUEST
    body = ttrpc_pb2.Request(service="containerd.task.v2.Task", method="Connect",
                             payload=task_v2_pb2.ConnectRequest(id="x").SerializeToString())
    frame = HEADER.pack(len(body.SerializeToString()), 1, TYPE_REQUEST, 0) + \
        body.SerializeToString()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            try:  # the server may drop us before or after our request is sent
                s.sendall(frame)
                code = 1 if s.recv(100) else 0
            except (ConnectionResetError, BrokenPipeError):
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_peers_with_another_uid_are_refused(env, leak_check):
    pod = _uid("upod")
    b = env.bundle(pod)
    shim = asyncio.run(start_shim(env.cfg, pod, b))
    leak_check.watch_socket(shim.socket_path)
    try:
        # open the path and the file mode so that only the SO_PEERCRED check stands in the way
        os.chmod(env.root, 0o711)
        os.chmod(shim.socket_path, 0o666)
        assert _probe_as_nobody(shim.socket_path) == 0

        async def main():
            async with await TaskClient.dial(shim.address, namespace=NS) as client:
                assert (await client.connect(id=pod)).shim_pid == shim.pid  # our uid may
                await client.shutdown(id=pod)
            assert await shim.wait_exit(10.0)
            shim.untrack_container(pod)
        asyncio.run(main())
    finally:
        asyncio.run(shim.cleanup())


def test_create_cancelled_mid_boot_stops_its_vm_and_can_be_retried(env, leak_check):
    pod = _uid("cpod")
    pb_ = env.bundle(pod)

    def agents() -> list:
        return processes.find_processes(under=env.rt, cmdline_contains=["bench.vm.agent"])

    async def main():
        shim = await start_shim(env.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            async with await TaskClient.dial(shim.address, namespace=NS) as client:
                # a deadline far shorter than any boot: the server cancels the Create
                with pytest.raises(TtrpcError) as ei:
                    await client.create(id=pod, bundle=str(pb_), timeout=0.001)
                assert ei.value.code == Code.DEADLINE_EXCEEDED
                assert await _until(lambda: not agents() and
                                    launch.read_state(pb_)["vm"] is None)
                assert (await client.create(id=pod, bundle=str(pb_))).pid == 0
                assert len(agents()) == 1
                await client.shutdown(id=pod, now=True)
            assert await shim.wait_exit(10.0)
            assert not agents()
            shim.untrack_container(pod)
        finally:
            await shim.cleanup()

    asyncio.run(main())
