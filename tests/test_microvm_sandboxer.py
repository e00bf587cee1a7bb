"""The sandboxer's microVM backend over real QEMU (TCG here): Start restores a VM from the
template snapshot (current schema) or cold-boots one (legacy schema, per-sandbox annotation),
returns the guest agent's address, which a Task client then dials directly (the sandboxer holds
no connection to it); Stop ends the VM and Wait reports it; a sandboxer restart finds a running
VM again; Shutdown leaves nothing behind."""
from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import grpc
import pytest

from bench.rpc.pb import containerd_task_types_pb2 as ttypes
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.pb import sandbox_current_pb2 as cur
from bench.rpc.pb import sandbox_legacy_pb2 as leg
from bench.rpc.schemas import ControllerStub
from bench.rpc.task_client import TaskClient
from bench.sandboxer.harness import SandboxerProcess
from bench.tracing import read_spans
import test_vmshim_qemu

snapshot = test_vmshim_qemu.snapshot  # kernel, initramfs and template snapshot, by name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def _sandboxer(tmp_path: Path, leak_check, schema: str, boot: str) -> SandboxerProcess:
    s = SandboxerProcess(schema, trace_dir=str(tmp_path / "trace"),
                         extra=("--backend", "vm", "--vm-boot", boot))
    leak_check.watch_dir(s.base)
    leak_check.watch_socket(s.sock)
    return s


def _qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"qemu-system" in fh.read()
    except FileNotFoundError:
        return False


async def _run_task(address: str, cid: str) -> None:
    """Dial the returned address like the engine does and run a container in the guest."""
    from google.protobuf import any_pb2
    import json
    opts = any_pb2.Any(type_url=PROCESS_URL,
                       value=json.dumps({"args": ["sleep", "300"], "cwd": "/"}).encode())
    async with await TaskClient.dial(address, timeout=60) as tc:
        await tc.create(id=cid, bundle="", options=opts)
        pid = (await tc.start(id=cid)).pid
        assert pid > 0
        st = await tc.state(id=cid)
        assert st.status == ttypes.RUNNING
        await tc.kill(id=cid, signal=int(signal.SIGKILL))
        assert (await tc.wait(id=cid)).exit_status == 128 + signal.SIGKILL
        await tc.delete(id=cid)


@pytest.mark.timeout(600)
def test_restored_vm_sandbox_lifecycle_and_recovery(tmp_path, leak_check, snapshot):
    s = _sandboxer(tmp_path, leak_check, "current", "restore")
    sid, cid = f"vm-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"

    async def phase1() -> tuple[str, int]:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "current")
            await st.Create(cur.ControllerCreateRequest(sandbox_id=sid))
            r = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
            assert r.version == 2 and r.address == f"ttrpc+unix://{s.dir}/{sid}/agent.sock"
            assert _qemu_alive(r.pid)
            # Idempotent Start: same VM, same address.
            again = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
            assert (again.pid, again.address) == (r.pid, r.address)
            await _run_task(r.address, cid)
            # The engine's connection is closed: the agent takes the next one.
            await _run_task(r.address, cid + "b")
            status = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid, verbose=True))
            assert status.state == "SANDBOX_READY" and status.info["backend"] == "vm"
            assert status.info["boot"] == "restore"
            return r.address, r.pid

    async def phase2(pid: int) -> None:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "current")
            status = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
            assert status.state == "SANDBOX_READY" and status.pid == pid
            waiter = asyncio.ensure_future(st.Wait(cur.ControllerWaitRequest(sandbox_id=sid)))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await st.Stop(cur.ControllerStopRequest(sandbox_id=sid))
            w = await asyncio.wait_for(waiter, 30)
            assert w.exited_at.seconds > 0
            assert not _qemu_alive(pid)
            status = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
            assert status.state == "SANDBOX_NOTREADY" and status.pid == 0 and not status.address
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))

    try:
        s.start()
        address, pid = asyncio.run(phase1())
        s.stop()  # SIGTERM without --cleanup-on-exit: the VM outlives its sandboxer ...
        assert _qemu_alive(pid)
        s.start()  # ... and the next one adopts it from sandbox.json
        asyncio.run(phase2(pid))
        assert not (s.dir / sid).exists()
        s.stop()
        spans = {(x["step"], x["component"]) for x in read_spans(tmp_path / "trace")
                 if x["pod"] == sid and x["call"] == "RunPodSandbox"}
        for want in [("sandbox.create", "sandboxer"), ("sandbox.start", "sandboxer"),
                     ("vm.restore", "vmm"), ("agent.ready", "sandboxer")]:
            assert want in spans, (want, spans)
    finally:
        s.teardown()


@pytest.mark.timeout(600)
def test_cold_boot_by_annotation_legacy_schema_and_vm_death(tmp_path, leak_check, snapshot):
    # The sandboxer defaults to restore; the pod asks for a cold boot.
    s = _sandboxer(tmp_path, leak_check, "legacy", "restore")
    sid = f"vm-{uuid.uuid4().hex[:8]}"
    cfg = cri.PodSandboxConfig(annotations={"io.chainbench.vm.boot": "cold"})
    cfg.metadata.name = "cold-pod"

    async def main() -> None:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "legacy")
            from google.protobuf import any_pb2
            bad = cri.PodSandboxConfig(annotations={"io.chainbench.vm.boot": "warm"})
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await st.Create(leg.ControllerCreateRequest(
                    sandbox_id=sid + "x", options=any_pb2.Any(value=bad.SerializeToString())))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await st.Create(leg.ControllerCreateRequest(
                sandbox_id=sid, options=any_pb2.Any(value=cfg.SerializeToString())))
            r = await st.Start(leg.ControllerStartRequest(sandbox_id=sid))
            assert r.task_address == f"unix://{s.dir}/{sid}/agent.sock"
            await _run_task(r.task_address, "c1")
            # A VM that dies on its own ends the sandbox: Wait answers with its status.
            waiter = asyncio.ensure_future(st.Wait(leg.ControllerWaitRequest(sandbox_id=sid)))
            os.kill(r.pid, signal.SIGKILL)
            w = await asyncio.wait_for(waiter, 30)
            assert w.exit_status == 128 + signal.SIGKILL
            status = await st.Status(leg.ControllerStatusRequest(sandbox_id=sid, verbose=True))
            assert status.state == "SANDBOX_NOTREADY" and status.info["boot"] == "cold"
            await st.Shutdown(leg.ControllerShutdownRequest(sandbox_id=sid))

    try:
        s.start()
        asyncio.run(main())
        s.stop()
        spans = {x["step"] for x in read_spans(tmp_path / "trace") if x["pod"] == sid}
        assert {"vm.boot", "agent.ready", "sandbox.start"} <= spans, spans
        assert "vm.restore" not in spans
    finally:
        s.teardown()


@pytest.mark.timeout(300)
def test_restart_kills_a_vm_left_by_a_start_cut_short(tmp_path, leak_check, snapshot):
    """The sandboxer died during Start: no record names the QEMU it had spawned, but its
    command line names the sandbox's agent socket; the next sandboxer kills it."""
    import json
    import subprocess
    from bench import processes
    from bench.vmshim.qemu_adapter import vm_config
    s = _sandboxer(tmp_path, leak_check, "current", "restore")
    sid = f"vm-{uuid.uuid4().hex[:8]}"
    d = s.dir / sid
    d.mkdir(parents=True)
    (d / "sandbox.json").write_text(json.dumps(
        {"id": sid, "dir": str(d), "state": "created", "backend": "vm", "boot": "restore"}))
    argv = vm_config().argv(socket_path=str(d / "agent.sock"), qmp_path=str(d / "qmp.sock"),
                            serial_log=str(d / "serial.log"), incoming="defer")
    stray = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.REGISTRY.register(stray.pid, "vmm", "stray", group=True)
    try:
        s.start()
        assert stray.wait(30) == -signal.SIGKILL

        async def main() -> None:
            async with grpc.aio.insecure_channel(s.target) as ch:
                st = ControllerStub(ch, "current")
                status = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
                assert status.state == "SANDBOX_NOTREADY" and not status.address
                await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))

        asyncio.run(main())
        assert not d.exists()
    finally:
        processes.REGISTRY.unregister(stray.pid)
        if stray.poll() is None:
            stray.kill()
            stray.wait()
        s.teardown()


def _pool_vmms(pool_dir: Path) -> dict[int, str]:
    """pid -> slot of every QEMU running from a pool slot below `pool_dir`."""
    from bench import processes
    out = {}
    for p in processes.find_processes(cmdline_contains=[f"{pool_dir}/"]):
        if any(a.startswith("socket,id=c0,path=") for a in p.cmdline):
            sock = next(a for a in p.cmdline if a.startswith("socket,id=c0,path="))
            out[p.pid] = str(Path(sock.split("path=")[1].split(",")[0]).parent)
    return out


@pytest.mark.timeout(600)
def test_vm_pool_serves_a_start_and_a_killed_sandboxers_pool_is_swept(tmp_path, leak_check,
                                                                       snapshot, monkeypatch):
    """The sandboxer keeps QEMUs prespawned; Start takes one (the address is the sandbox's own
    socket, a symlink to the pooled VM's).  After a SIGKILL the claimed VM is recovered and the
    unclaimed ones are killed by the next sandboxer; a SIGTERM leaves no pool VM behind."""
    s = _sandboxer(tmp_path, leak_check, "current", "restore")
    pool_dir = s.dir / ".vmpool"  # the sandboxer keeps its pool below its --dir
    monkeypatch.setenv("CHAINBENCH_VM_POOL", "2")
    sid = f"vm-{uuid.uuid4().hex[:8]}"

    async def until(pred, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            assert asyncio.get_running_loop().time() < deadline, "not in time"
            await asyncio.sleep(0.1)

    def ready() -> dict[int, str]:
        return {pid: slot for pid, slot in _pool_vmms(pool_dir).items()
                if (Path(slot) / "ready").exists()}

    async def start_one() -> int:
        await until(lambda: len(ready()) == 2)
        pooled = ready()
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "current")
            await st.Create(cur.ControllerCreateRequest(sandbox_id=sid))
            r = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))
        assert r.pid in pooled and r.address == f"ttrpc+unix://{s.dir}/{sid}/agent.sock"
        assert (s.dir / sid / "agent.sock").is_symlink()
        await _run_task(r.address, f"c-{sid}")
        await until(lambda: len(_pool_vmms(pool_dir)) == 3)  # refilled: 2 idle + ours
        return r.pid

    async def after_restart(pid: int) -> None:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "current")
            status = await st.Status(cur.ControllerStatusRequest(sandbox_id=sid))
            assert status.state == "SANDBOX_READY" and status.pid == pid
            await _run_task(status.address, f"d-{sid}")
            await st.Stop(cur.ControllerStopRequest(sandbox_id=sid))
            await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))
        assert not _qemu_alive(pid)

    try:
        s.start()
        pid = asyncio.run(start_one())
        old_idle = set(_pool_vmms(pool_dir)) - {pid}
        s.kill9()
        assert all(_qemu_alive(p) for p in old_idle)  # nobody left to stop them ...
        s.start()  # ... until the next sandboxer sweeps them; its own pool fills anew
        asyncio.run(until(lambda: not any(_qemu_alive(p) for p in old_idle)))
        asyncio.run(after_restart(pid))
        asyncio.run(until(lambda: len(_pool_vmms(pool_dir)) == 2))
        s.stop()  # SIGTERM: its pool goes with it
        assert _pool_vmms(pool_dir) == {} and not pool_dir.exists()
    finally:
        s.teardown()
