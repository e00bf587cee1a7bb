"""Real QEMU microVMs (TCG here): cold boot, template snapshot + concurrent clones, teardown."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from bench import processes
from bench.rpc.pb import containerd_task_types_pb2 as tt
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client, Code, Server, TtrpcError
from bench.tracing import Tracer, read_spans
from bench.vm import kernel
from bench.vm.qemu import TASK_SERVICE, MicroVM, Snapshot, VMConfig
from bench.vm.relay import AgentRelay
from bench.vm.snapshot import create_snapshot, ensure_snapshot

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config() -> VMConfig:
    kernel.build(quiet=True)  # cached no-op once CI's set-up has built it
    return VMConfig.default()


@pytest.fixture(scope="module")
def snapshot(config: VMConfig, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return asyncio.run(ensure_snapshot(tmp_path_factory.mktemp("snap"), config))


def proc_any(args: list[str]) -> any_pb2.Any:
    return any_pb2.Any(type_url=PROCESS_URL, value=json.dumps({"args": args}).encode())


async def call(c: Client, method: str, req: object, resp: type) -> object:
    return await c.call(TASK_SERVICE, method, req, resp, timeout=60)


async def run_workload(vm: MicroVM, cid: str, code: int) -> None:
    c = await vm.dial()
    try:
        conn = await call(c, "Connect", pb.ConnectRequest(), pb.ConnectResponse)
        assert conn.version.startswith("chainbench-agent") and conn.shim_pid == 1
        await call(c, "Create", pb.CreateTaskRequest(
            id=cid, options=proc_any(["sh", "-c", f"exit {code}"])), pb.CreateTaskResponse)
        started = await call(c, "Start", pb.StartRequest(id=cid), pb.StartResponse)
        assert started.pid > 1
        w = await call(c, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
        assert w.exit_status == code
        st = await call(c, "State", pb.StateRequest(id=cid), pb.StateResponse)
        assert st.status == tt.STOPPED and st.exit_status == code
        d = await call(c, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
        assert d.pid == started.pid
    finally:
        await c.close()


def assert_gone(vm: MicroVM, pid: int | None) -> None:
    assert pid is not None
    assert not processes.find_processes(cmdline_contains=[str(vm.workdir)])
    for p in (vm.socket_path, vm.qmp_path):
        assert not os.path.exists(p), p


@pytest.mark.slow
def test_cold_boot_task_lifecycle(config: VMConfig, tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)

    async def main() -> None:
        vm = MicroVM("cold", tmp_path / "cold", config)
        try:
            times = await vm.boot()
            assert times.total_s > 0 and vm.accel in ("tcg", "kvm")
            await run_workload(vm, "w1", 5)
            # a second host connection after the first closed is a fresh session
            c = await vm.dial()
            try:
                await call(c, "Create", pb.CreateTaskRequest(id="pod"), pb.CreateTaskResponse)
                await call(c, "Start", pb.StartRequest(id="pod"), pb.StartResponse)
                pids = await call(c, "Pids", pb.PidsRequest(id="pod"), pb.PidsResponse)
                assert len(pids.processes) == 1
                await call(c, "Kill", pb.KillRequest(id="pod", signal=9), empty_pb2.Empty)
                w = await call(c, "Wait", pb.WaitRequest(id="pod"), pb.WaitResponse)
                assert w.exit_status == 137
                with pytest.raises(TtrpcError) as e:
                    await call(c, "Start", pb.StartRequest(id="../etc"), pb.StartResponse)
                assert e.value.code == Code.INVALID_ARGUMENT
                # Shutdown with no containers left powers the guest off; QEMU exits by itself.
                await call(c, "Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse)
                await call(c, "Shutdown", pb.ShutdownRequest(id="pod"), empty_pb2.Empty)
            finally:
                await c.close()
            pid = vm.pid
            assert vm.proc is not None
            assert await asyncio.wait_for(vm.proc.wait(), 60) == 0
        finally:
            await vm.stop()
        assert_gone(vm, pid)
    asyncio.run(main())


@pytest.mark.slow
def test_snapshot_restore_two_concurrent_clones(config: VMConfig, tmp_path: Path,
                                                leak_check) -> None:
    leak_check.watch_dir(tmp_path)

    async def main() -> None:
        snap = await create_snapshot(tmp_path / "snap", config)
        assert snap.size > 0 and Snapshot.load(tmp_path / "snap") == snap
        tracer = Tracer.from_dir(tmp_path / "trace", "sandboxer")
        clones = [MicroVM(f"clone{i}", tmp_path / f"c{i}", config, tracer=tracer,
                          pod=f"pod{i}", call="RunPodSandbox") for i in range(2)]
        try:
            await asyncio.gather(*(vm.restore(snap) for vm in clones))
            assert len({vm.socket_path for vm in clones}) == 2
            for vm in clones:
                assert vm.times.vmm_s > 0 and vm.times.agent_s > 0
                mem = vm.memory()
                assert mem is not None and mem.pss > 0
            await asyncio.gather(*(run_workload(vm, f"job{i}", 10 + i)
                                   for i, vm in enumerate(clones)))
            # quick close/reconnect cycles: each new host connection is a fresh ttrpc session
            for _ in range(5):
                c = await clones[0].dial()
                try:
                    await call(c, "Connect", pb.ConnectRequest(), pb.ConnectResponse)
                    await call(c, "Connect", pb.ConnectRequest(), pb.ConnectResponse)
                finally:
                    await c.close()
            tracer.flush()
            spans = read_spans(tmp_path / "trace")
            assert sorted((s["pod"], s["step"]) for s in spans) == [
                ("pod0", "agent.ready"), ("pod0", "vm.restore"),
                ("pod1", "agent.ready"), ("pod1", "vm.restore")]
            assert all(s["end_ns"] > s["start_ns"] for s in spans)
            pids = [vm.pid for vm in clones]
        finally:
            await asyncio.gather(*(vm.stop() for vm in clones))
        for vm, pid in zip(clones, pids):
            assert_gone(vm, pid)
    asyncio.run(main())


def test_restore_rejects_a_foreign_config(config: VMConfig, tmp_path: Path) -> None:
    snap = Snapshot(tmp_path / "vm.snap", config, 1)
    other = VMConfig(**{**config.__dict__, "memory_mb": config.memory_mb * 2})
    vm = MicroVM("x", tmp_path / "x", other)
    with pytest.raises(Exception, match="snapshot's config"):
        asyncio.run(vm.restore(snap))
    assert vm.pid is None


def test_recover_reattaches_to_a_running_clone(config: VMConfig, snapshot: Snapshot,
                                                tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)
    snap = snapshot

    async def main() -> None:
        vm = MicroVM("orig", tmp_path / "orig", config)
        again = None
        try:
            await vm.restore(snap)
            rec = json.loads(json.dumps(vm.record()))  # as a sandboxer would persist it
            assert vm.qmp is not None
            await vm.qmp.close()  # the old owner "dies": its QMP connection goes away
            vm.qmp = None
            again = await MicroVM.recover(rec)
            assert again.pid == vm.pid and again.running() and again.qmp is not None
            c = await again.dial()
            try:
                conn = await call(c, "Connect", pb.ConnectRequest(), pb.ConnectResponse)
                assert conn.shim_pid == 1
            finally:
                await c.close()
            await again.stop()
            assert not again.running()
            with pytest.raises(Exception, match="gone"):
                await MicroVM.recover(rec)
        finally:
            if again is not None:
                await again.stop()
            await vm.stop()
        assert not processes.find_processes(cmdline_contains=[str(tmp_path / "orig")])
    asyncio.run(main())


def test_relay_multiplexes_host_clients_onto_the_agent(config: VMConfig, snapshot: Snapshot,
                                                       tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)
    host_sock = str(tmp_path / "shim.sock")
    leak_check.watch_socket(host_sock)

    async def main() -> None:
        vm = MicroVM("relayed", tmp_path / "vm", config)
        server = Server()
        relay = AgentRelay(vm)
        try:
            await vm.restore(snapshot)
            server.register(TASK_SERVICE, relay.methods())
            await server.start(host_sock)
            # two engine-side connections at once; the agent port only ever sees the relay's
            engines = [await Client.connect(host_sock) for _ in range(2)]
            try:
                async def pod(c: Client, cid: str, code: int) -> None:
                    await call(c, "Create", pb.CreateTaskRequest(
                        id=cid, options=proc_any(["sh", "-c", f"exit {code}"])),
                        pb.CreateTaskResponse)
                    await call(c, "Start", pb.StartRequest(id=cid), pb.StartResponse)
                    w = await call(c, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
                    assert w.exit_status == code
                    await call(c, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
                await asyncio.gather(pod(engines[0], "a", 1), pod(engines[1], "b", 2))
                with pytest.raises(TtrpcError) as e:  # agent errors come back unchanged
                    await call(engines[0], "State", pb.StateRequest(id="a"), pb.StateResponse)
                assert e.value.code == Code.NOT_FOUND
            finally:
                for c in engines:
                    await c.close()
        finally:
            await server.close()
            await relay.close()
            await vm.stop()
    asyncio.run(main())
