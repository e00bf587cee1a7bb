"""The microVM shim over real QEMU microVMs (TCG here): the engine's launcher starts the shim,
the sandbox's Create restores (or cold-boots) a VM whose guest agent then gets every relayed
Task call; Shutdown, a killed shim + `delete`, and a VM that dies under the shim."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from bench.rpc.pb import containerd_task_types_pb2 as types_pb
from bench.rpc.task_client import TaskClient
from bench.rpc.ttrpc import Code, TtrpcError
from bench.runtimes.shimv2 import delete_shim, start_shim
from bench.tracing import read_spans
from bench.vm import kernel
from bench.vmshim import launch, qemu_adapter
from test_vmshim_host import NS, Env, _uid, _until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def snapshot() -> Path:
    kernel.build(quiet=True)  # cached no-op once CI's set-up has built it
    from bench.vm.qemu import VMConfig
    VMConfig.default()  # builds the initramfs into the cache when missing
    cfg = qemu_adapter.vm_config()
    return asyncio.run(qemu_adapter.ensure_snapshot(cfg)).path


@pytest.fixture
def qenv(tmp_path, leak_check, snapshot):
    e = Env(tmp_path, leak_check, backend="qemu", boot="restore")
    yield e
    e.close()


def _qemu_alive(vm: dict) -> bool:
    return launch.alive(vm["pid"], vm["ticks"])


@pytest.mark.timeout(900)
def test_restored_microvm_pod_lifecycle_through_the_shim(qenv, leak_check):
    pod, ctr = _uid("qpod"), _uid("qctr")
    pb_ = qenv.bundle(pod)
    cb = qenv.bundle(ctr, process={"args": ["sh", "-c", "sleep 300"], "cwd": "/"})

    async def main():
        shim = await start_shim(qenv.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            client = await TaskClient.dial(shim.address, namespace=NS, timeout=120)
            assert (await client.create(id=pod, bundle=str(pb_))).pid == 0
            vm = launch.read_state(pb_)["vm"]
            assert _qemu_alive(vm) and vm["stop"] == "kill" and vm["accel"] in ("tcg", "kvm")
            with open(f"/proc/{vm['pid']}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            assert b"-incoming" in argv and b"microvm" in b" ".join(argv)
            p = await client.start(id=pod)
            assert p.pid > 1  # a guest pid
            st = await client.state(id=pod)
            assert st.status == types_pb.RUNNING and st.pid == p.pid
            conn = await client.connect(id=pod)
            assert conn.shim_pid == shim.pid and conn.task_pid == p.pid

            await client.create(id=ctr, bundle=str(cb))
            c = await client.start(id=ctr)
            assert (await client.state(id=ctr)).status == types_pb.RUNNING
            with pytest.raises(TtrpcError) as ei:
                await client.state(id="not-there")
            assert ei.value.code == Code.NOT_FOUND
            await client.kill(id=ctr, signal=signal.SIGKILL)
            assert (await client.wait(id=ctr)).exit_status == 137
            assert (await client.delete(id=ctr)).pid == c.pid
            await client.kill(id=pod, signal=signal.SIGKILL)
            assert (await client.wait(id=pod)).exit_status == 137
            await client.delete(id=pod)
            shim.untrack_container(pod)
            await client.shutdown(id=pod)
            assert await shim.wait_exit(20.0)
            await client.close()
            assert await _until(lambda: not _qemu_alive(vm), 10)
            assert not os.path.exists(shim.socket_path) and not Path(vm["workdir"]).exists()
        finally:
            await shim.cleanup()

    asyncio.run(main())
    steps = [(s["step"], s["component"]) for s in read_spans(qenv.trace) if s["pod"] == pod]
    assert steps[:3] == [("vm.restore", "vmm"), ("agent.ready", "shim"), ("task.create", "shim")]
    assert steps.count(("task.create", "shim")) == 2


@pytest.mark.timeout(900)
def test_cold_booted_microvm_killed_shim_then_delete(qenv, leak_check):
    pod = _uid("cpod")
    pb_ = qenv.bundle(pod, vm_json={"boot": "cold"})

    async def main():
        shim = await start_shim(qenv.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            async with await TaskClient.dial(shim.address, namespace=NS, timeout=120) as client:
                await client.create(id=pod, bundle=str(pb_))
                p = await client.start(id=pod)
            vm = launch.read_state(pb_)["vm"]
            with open(f"/proc/{vm['pid']}/cmdline", "rb") as fh:
                assert b"-incoming" not in fh.read().split(b"\0")
            shim.kill(signal.SIGKILL)
            assert await shim.wait_exit(5.0)
            assert _qemu_alive(vm)  # the VMM outlives its shim until `delete`
            res = await delete_shim(qenv.cfg, pod, pb_)
            assert res.exit_status == 137 and res.pid == p.pid
            assert await _until(lambda: not _qemu_alive(vm), 10)
            assert not os.path.exists(shim.socket_path) and not Path(vm["workdir"]).exists()
            shim.untrack_container(pod)
        finally:
            await shim.cleanup()

    asyncio.run(main())
    steps = [s["step"] for s in read_spans(qenv.trace) if s["pod"] == pod]
    assert steps[:2] == ["vm.boot", "agent.ready"]


@pytest.mark.timeout(900)
def test_microvm_crash_answers_wait_and_ends_the_shim(qenv, leak_check):
    pod = _uid("xpod")
    pb_ = qenv.bundle(pod)

    async def main():
        shim = await start_shim(qenv.cfg, pod, pb_)
        leak_check.watch_socket(shim.socket_path)
        try:
            client = await TaskClient.dial(shim.address, namespace=NS, timeout=120)
            await client.create(id=pod, bundle=str(pb_))
            await client.start(id=pod)
            vm = launch.read_state(pb_)["vm"]
            waiter = asyncio.ensure_future(client.wait(id=pod, timeout=60))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            os.kill(vm["pid"], signal.SIGKILL)
            w = await waiter
            assert w.exit_status == 255
            assert await shim.wait_exit(10.0)
            await client.close()
            assert not os.path.exists(shim.socket_path)
            assert (await delete_shim(qenv.cfg, pod, pb_)).exit_status == 137
            assert not Path(vm["workdir"]).exists()
            shim.untrack_container(pod)
        finally:
            await shim.cleanup()

    asyncio.run(main())
