"""Sandboxer end to end, as root with real runc: both Sandbox API schemas, a busybox `sleep`
container in the pinned namespaces, Task API over the per-sandbox ttrpc socket, teardown with
zero leftovers."""
from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from bench.processes import mounts_below
from bench.rpc.pb import containerd_types_pb2 as ct
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.pb import sandbox_current_pb2 as cur
from bench.rpc.pb import sandbox_legacy_pb2 as leg
from bench.rpc.pb import containerd_task_types_pb2 as ttypes
from bench.rpc.schemas import ControllerStub
from bench.rpc.task_client import TaskClient
from bench.rpc.ttrpc import Code, TtrpcError
from bench.runtimes import assets, oci
from bench.sandboxer.harness import SandboxerProcess
from bench.tracing import read_spans


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def rootfs() -> str:
    return str(assets.ensure_rootfs())


@pytest.fixture
def sandboxer_factory(tmp_path, leak_check):
    made: list[SandboxerProcess] = []

    def make(schema: str, trace: bool = False) -> SandboxerProcess:
        s = SandboxerProcess(schema, trace_dir=str(tmp_path / "trace") if trace else "")
        made.append(s)
        leak_check.watch_dir(s.base)
        leak_check.watch_socket(s.sock)
        return s.start()

    yield make
    for s in made:
        s.teardown()


def pod_options(name: str, hostname: str, host_network: bool) -> any_pb2.Any:
    cfg = cri.PodSandboxConfig(hostname=hostname)
    cfg.metadata.name = name
    if host_network:
        cfg.linux.security_context.namespace_options.network = cri.NODE
    # iSulad sends the binary config with an empty type_url
    return any_pb2.Any(value=cfg.SerializeToString())


def ns_inode(pid: int, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def run_container_cycle(tc: TaskClient, cid: str, bundle: str, sb_dir: Path,
                              pinned: dict[str, str], rootfs: list[ct.Mount] = (),
                              host: tuple[str, ...] = ()) -> int:
    cr = await tc.create(id=cid, bundle=bundle, rootfs=list(rootfs))
    pid = cr.pid
    assert pid > 0
    st = await tc.state(id=cid)
    assert st.status == ttypes.CREATED
    assert (await tc.start(id=cid)).pid == pid
    st = await tc.state(id=cid)
    assert st.status == ttypes.RUNNING and st.pid == pid
    for proc_ns, pin_name in pinned.items():
        assert ns_inode(pid, proc_ns) == os.stat(sb_dir / "ns" / pin_name).st_ino, proc_ns
    for proc_ns in host:
        assert ns_inode(pid, proc_ns) == ns_inode(os.getpid(), proc_ns), proc_ns
    # pid and mount namespaces are the container's own
    assert ns_inode(pid, "pid") != ns_inode(os.getpid(), "pid")
    assert pid in [p.pid for p in (await tc.pids(id=cid)).processes]
    await check_execs(tc, cid, sb_dir, pinned)
    waiter = asyncio.ensure_future(tc.wait(id=cid, timeout=60))
    await asyncio.sleep(0)
    await tc.kill(id=cid, signal=9)
    w = await waiter
    assert w.exit_status == 137
    assert (await tc.state(id=cid)).status == ttypes.STOPPED
    d = await tc.delete(id=cid)
    assert d.pid == pid and d.exit_status == 137
    assert not alive(pid)
    return pid


def process_spec(*args: str) -> any_pb2.Any:
    proc = {"args": list(args), "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps(proc).encode())


async def check_execs(tc: TaskClient, cid: str, sb_dir: Path, pinned: dict[str, str]) -> None:
    """Exec processes run inside the container (same pinned namespaces) and report exits."""
    await tc.exec(id=cid, exec_id="quick", spec=process_spec("sh", "-c", "exit 3"))
    st = await tc.state(id=cid, exec_id="quick")
    assert st.status == ttypes.CREATED and st.exec_id == "quick"
    await tc.start(id=cid, exec_id="quick")
    assert (await tc.wait(id=cid, exec_id="quick", timeout=60)).exit_status == 3
    d = await tc.delete(id=cid, exec_id="quick")
    assert d.exit_status == 3 and d.pid > 0
    await tc.exec(id=cid, exec_id="long", spec=process_spec("sleep", "1000"))
    epid = (await tc.start(id=cid, exec_id="long")).pid
    for proc_ns, pin_name in pinned.items():
        assert ns_inode(epid, proc_ns) == os.stat(sb_dir / "ns" / pin_name).st_ino
    with pytest.raises(TtrpcError) as ei:
        await tc.exec(id=cid, exec_id="long", spec=process_spec("true"))
    assert ei.value.code == Code.ALREADY_EXISTS
    with pytest.raises(TtrpcError) as ei:
        await tc.delete(id=cid, exec_id="long")
    assert ei.value.code == Code.FAILED_PRECONDITION
    await tc.kill(id=cid, exec_id="long", signal=9)
    assert (await tc.wait(id=cid, exec_id="long", timeout=60)).exit_status == 137
    await tc.delete(id=cid, exec_id="long")
    assert not alive(epid)


def assert_clean(s: SandboxerProcess, sid: str, pids: list[int]) -> None:
    left = s.leftovers()
    assert left["mounts"] == [], left
    assert left["files"] == [], left
    assert not (s.dir / sid).exists()
    for pid in pids:
        assert not alive(pid)


def test_current_schema_full_cycle(sandboxer_factory, rootfs, leak_check):
    s = sandboxer_factory("current", trace=True)
    sid, cid = uid("sb"), uid("c")
    leak_check.watch_cgroup(f"{oci.CGROUP_PARENT}/{cid}")

    async def go() -> list[int]:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "current")
            await st.Create(cur.ControllerCreateRequest(
                sandbox_id=sid, sandboxer="chainbench",
                options=pod_options("pod-a", "pod-a-host", host_network=False)))
            stat = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
            assert stat.state == "SANDBOX_NOTREADY" and stat.address == ""
            r = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
            sb_dir = s.dir / sid
            assert r.address == f"ttrpc+unix://{sb_dir / 'task.sock'}" and r.version == 2
            # Start again: idempotent, same answer
            r2 = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
            assert r2.address == r.address
            stat = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
            assert stat.state == "SANDBOX_READY" and stat.address == r.address
            assert stat.version == 2 and stat.pid == s.pid
            verbose = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid, verbose=True))
            assert verbose.info["name"] == "pod-a"
            assert verbose.info["pinned"] == "ipc,uts,network"
            plat = await st.Platform(cur.ControllerPlatformRequest(sandbox_id=sid))
            assert (plat.platform.os, plat.platform.architecture) == ("linux", "amd64")
            assert sorted(os.listdir(sb_dir / "ns")) == ["ipc", "net", "uts"]
            await st.Metrics(cur.ControllerMetricsRequest(sandbox_id=sid))

            spec = oci.container_spec(rootfs, cid, ["sleep", "1000"], hostname="ignored")
            sandbox = ct.Sandbox(sandbox_id=sid)
            sandbox.extensions["tasks"].type_url = "github.com/containerd/containerd/Tasks"
            sandbox.extensions["tasks"].value = json.dumps(
                {"tasks": [{"task_id": cid, "spec": spec, "rootfs": []}]}).encode()
            await st.Update(cur.ControllerUpdateRequest(
                sandbox_id=sid, sandbox=sandbox, fields=["extensions.tasks"]))
            cfg = json.loads((sb_dir / "c" / cid / "config.json").read_text())
            assert {"type": "ipc", "path": str(sb_dir / "ns" / "ipc")} in cfg["linux"]["namespaces"]

            async with await TaskClient.dial(r.address) as tc:
                pid = await run_container_cycle(
                    tc, cid, "/engine/bundle/ignored", sb_dir,
                    {"ipc": "ipc", "uts": "uts", "net": "net"})
                # the pod's hostname was set in the pinned uts namespace
                # (checked through a second run of the same prepared container)
                cr = await tc.create(id=cid, bundle="")
                assert os.readlink(f"/proc/{cr.pid}/ns/uts") == \
                    f"uts:[{os.stat(sb_dir / 'ns' / 'uts').st_ino}]"
                await tc.start(id=cid)
                pid2 = cr.pid
                conn = await tc.connect_task(id=cid)
                assert conn.shim_pid == s.pid and conn.task_pid == pid2
                # Stop kills the running container and releases the namespaces
                waiter = asyncio.ensure_future(
                    st.Wait(cur.ControllerWaitRequest(sandbox_id=sid)))
                await st.Stop(cur.ControllerStopRequest(sandbox_id=sid, timeout_secs=1))
                w = await waiter
                assert w.exit_status == 0 and w.exited_at.seconds > 0
                assert not alive(pid2)
                assert not (sb_dir / "ns" / "ipc").exists()
                assert mounts_below(sb_dir) == []
                stat = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
                assert stat.state == "SANDBOX_NOTREADY" and stat.pid == 0
                # the engine can still collect the task after Stop
                assert (await tc.wait(id=cid)).exit_status == 137
                await tc.delete(id=cid)
            await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            # Shutdown and Stop of a gone sandbox: NotFound swallowed (Kuasar)
            await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))
            await st.Stop(cur.ControllerStopRequest(sandbox_id=sid))
            return [pid, pid2]

    pids = asyncio.run(go())
    assert_clean(s, sid, pids)
    assert s.stop() == 0
    assert not os.path.exists(s.sock)
    steps = {r["step"] for r in read_spans(s.trace_dir)}
    assert {"sandbox.create", "sandbox.start", "sandbox.update", "task.create", "task.start",
            "task.kill", "task.delete", "sandbox.stop",
            "sandbox.shutdown"} <= steps
    assert {r["pod"] for r in read_spans(s.trace_dir)} == {sid}


def test_legacy_schema_full_cycle(sandboxer_factory, rootfs, tmp_path, leak_check):
    s = sandboxer_factory("legacy")
    sid, cid, cid2 = uid("sb"), uid("c"), uid("c")
    for c in (cid, cid2):
        leak_check.watch_cgroup(f"{oci.CGROUP_PARENT}/{c}")

    async def go() -> list[int]:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "legacy")
            await st.Create(leg.ControllerCreateRequest(
                sandboxer="chainbench", sandbox_id=sid,
                options=pod_options("pod-b", "", host_network=True)))
            r = await st.Start(leg.ControllerStartRequest(sandboxer="chainbench", sandbox_id=sid))
            sb_dir = s.dir / sid
            assert r.task_address == f"unix://{sb_dir / 'task.sock'}"
            stat = await st.Status(leg.ControllerStatusRequest(sandbox_id=sid))
            assert stat.state == "SANDBOX_READY" and stat.task_address == r.task_address
            # host-network pod: only ipc is the pod's, uts and net are the host's
            assert os.listdir(sb_dir / "ns") == ["ipc"]
            await st.Platform(leg.ControllerPlatformRequest(sandbox_id=sid))

            spec = oci.container_spec(rootfs, cid, ["sleep", "1000"])
            prep = await st.Prepare(leg.PrepareRequest(
                sandbox_id=sid, container_id=cid,
                spec=any_pb2.Any(value=json.dumps(spec).encode())))
            assert prep.bundle == str(sb_dir / "c" / cid)
            await st.UpdateResources(leg.UpdateResourcesRequest(sandbox_id=sid,
                                                                container_id=cid))
            pids = []
            async with await TaskClient.dial(r.task_address) as tc:
                pid = await run_container_cycle(tc, cid, prep.bundle, sb_dir, {"ipc": "ipc"},
                                                host=("net", "uts"))
                pids.append(pid)
                # not prepared: Task.Create from an engine bundle dir with a rootfs bind mount
                bundle = tmp_path / "bundle2"
                spec2 = oci.container_spec("rootfs", cid2, ["sleep", "1000"])
                oci.write_bundle(bundle, spec2)
                pid2 = await run_container_cycle(
                    tc, cid2, str(bundle), sb_dir, {"ipc": "ipc"},
                    rootfs=[ct.Mount(type="bind", source=rootfs, options=["rbind", "ro"])])
                pids.append(pid2)
                assert mounts_below(sb_dir) == [str(sb_dir / "ns" / "ipc")]
            await st.Purge(leg.PurgeRequest(sandbox_id=sid, container_id=cid))
            assert not (sb_dir / "c" / cid).exists()
            await st.Stop(leg.ControllerStopRequest(sandbox_id=sid))
            w = await st.Wait(leg.ControllerWaitRequest(sandbox_id=sid))
            assert w.exit_status == 0
            await st.Shutdown(leg.ControllerShutdownRequest(sandbox_id=sid))
            return pids

    pids = asyncio.run(go())
    assert_clean(s, sid, pids)
    assert s.stop() == 0
