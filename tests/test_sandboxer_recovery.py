"""Sandboxer restart recovery (real runc, root): kill -9 the sandboxer with a running
container, restart it on the same dir, find the sandbox READY and its task reachable; then the
SIGTERM paths: leave sandboxes by default, tear down with --cleanup-on-exit."""
from __future__ import annotations

import asyncio
import json
import os
import uuid

import grpc

from bench.rpc.pb import containerd_task_types_pb2 as ttypes
from bench.rpc.pb import containerd_types_pb2 as ct
from bench.rpc.pb import sandbox_current_pb2 as cur
from bench.rpc.schemas import ControllerStub
from bench.rpc.task_client import TaskClient
from bench.runtimes import assets, oci
from bench.sandboxer import nspin
from bench.sandboxer.harness import SandboxerProcess


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def start_pod_with_container(target: str, sid: str, cid: str, rootfs: str) -> tuple[str, int]:
    async with grpc.aio.insecure_channel(target) as ch:
        st = ControllerStub(ch, "current")
        await st.Create(cur.ControllerCreateRequest(sandbox_id=sid))
        r = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
        sandbox = ct.Sandbox(sandbox_id=sid)
        spec = oci.container_spec(rootfs, cid, ["sleep", "1000"])
        sandbox.extensions["tasks"].value = json.dumps(
            {"tasks": [{"task_id": cid, "spec": spec}]}).encode()
        await st.Update(cur.ControllerUpdateRequest(sandbox_id=sid, sandbox=sandbox,
                                                    fields=["extensions.tasks"]))
    async with await TaskClient.dial(r.address) as tc:
        pid = (await tc.create(id=cid, bundle="")).pid
        await tc.start(id=cid)
    return r.address, pid


def watched(leak_check) -> tuple[SandboxerProcess, str, str]:
    s = SandboxerProcess("current")
    sid, cid = f"sb-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    leak_check.watch_dir(s.base)
    leak_check.watch_socket(s.sock)
    leak_check.watch_cgroup(f"{oci.CGROUP_PARENT}/{cid}")
    return s, sid, cid


def test_recovery_after_kill9(leak_check):
    rootfs = str(assets.ensure_rootfs())
    s, sid, cid = watched(leak_check)
    try:
        s.start()
        address, pid = asyncio.run(start_pod_with_container(s.target, sid, cid, rootfs))
        ipc_ino = os.stat(s.dir / sid / "ns" / "ipc").st_ino
        s.kill9()
        assert alive(pid)  # the container does not depend on the sandboxer process
        s.start()

        async def after_restart() -> None:
            async with grpc.aio.insecure_channel(s.target) as ch:
                st = ControllerStub(ch, "current")
                stat = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
                assert stat.state == "SANDBOX_READY" and stat.address == address
                assert os.stat(s.dir / sid / "ns" / "ipc").st_ino == ipc_ino
                async with await TaskClient.dial(address) as tc:
                    state = await tc.state(id=cid)
                    assert state.status == ttypes.RUNNING and state.pid == pid
                    waiter = asyncio.ensure_future(tc.wait(id=cid, timeout=60))
                    await asyncio.sleep(0)
                    await tc.kill(id=cid, signal=9)
                    # no longer our child: the status is inferred from the signal we sent
                    assert (await waiter).exit_status == 137
                    await tc.delete(id=cid)
                assert not alive(pid)
                await st.Stop(cur.ControllerStopRequest(sandbox_id=sid))
                await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))

        asyncio.run(after_restart())
        assert s.stop() == 0
        left = s.leftovers()
        assert left == {"mounts": [], "files": [], "processes": []}, left
    finally:
        s.teardown()
    assert not s.base.exists()


def test_sigterm_leaves_then_cleanup_on_exit_tears_down(leak_check):
    rootfs = str(assets.ensure_rootfs())
    s, sid, cid = watched(leak_check)
    try:
        s.start()
        _address, pid = asyncio.run(start_pod_with_container(s.target, sid, cid, rootfs))
        assert s.stop() == 0  # plain SIGTERM: the pod survives for the next sandboxer
        assert alive(pid)
        assert (s.dir / sid / "sandbox.json").exists()
        assert not os.path.exists(s.sock)
        s.start(cleanup=True)
        assert s.stop() == 0  # SIGTERM with --cleanup-on-exit: everything torn down
        assert not alive(pid)
        left = s.leftovers()
        assert left == {"mounts": [], "files": [], "processes": []}, left
    finally:
        s.teardown()


def test_recovery_with_lost_namespaces_stops_the_sandbox(leak_check):
    """Pins unmounted behind the sandboxer's back (e.g. by a cleanup script): the restarted
    sandboxer reports the sandbox as ended (exit 255) and kills what ran in it."""
    rootfs = str(assets.ensure_rootfs())
    s, sid, cid = watched(leak_check)
    try:
        s.start()
        _address, pid = asyncio.run(start_pod_with_container(s.target, sid, cid, rootfs))
        s.kill9()
        for ns in os.listdir(s.dir / sid / "ns"):
            nspin.umount(str(s.dir / sid / "ns" / ns))
        s.start()

        async def check() -> None:
            async with grpc.aio.insecure_channel(s.target) as ch:
                st = ControllerStub(ch, "current")
                stat = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
                assert stat.state == "SANDBOX_NOTREADY"
                w = await st.Wait(cur.ControllerWaitRequest(sandbox_id=sid))
                assert w.exit_status == 255
                await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))

        asyncio.run(check())
        assert not alive(pid)
        assert s.stop() == 0
        assert s.leftovers() == {"mounts": [], "files": [], "processes": []}
    finally:
        s.teardown()
