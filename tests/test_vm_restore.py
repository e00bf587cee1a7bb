"""Template restore paths: RAM-file snapshots (x-ignore-shared, clones map the template's RAM
copy-on-write), the snapshot identity (QEMU binary/version, kernel, initrd) that keys reuse, and
the sandboxer's pool of prespawned QEMUs (claim, refill, cleanup, sweep after a dead owner)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bench import processes
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client
from bench.sandboxer.vms import CLAIMED, VmBackend, pool_size_from_env
from bench.tracing import Tracer, read_spans
from bench.vm import snapshot
from bench.vm.qemu import TASK_SERVICE, MicroVM, Snapshot, VMConfig
from bench.vmshim import qemu_adapter
from test_vm_qemu import config, run_workload  # noqa: F401  (config: the VM recipe fixture)


# -- pure logic -----------------------------------------------------------------------------
def _fake_config(tmp_path: Path, version: str = "9.9.0") -> VMConfig:
    qemu = tmp_path / "bin" / "qemu-fake"
    qemu.parent.mkdir(exist_ok=True)
    qemu.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    qemu.chmod(0o755)
    for name in ("vmlinux", "initrd"):
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"x" * 64)
    return VMConfig(kernel=str(tmp_path / "vmlinux"), initrd=str(tmp_path / "initrd"),
                    tsc_khz=1000, qemu=str(qemu))


def test_snapshot_identity_follows_qemu_kernel_and_initrd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHAINBENCH_CACHE", str(tmp_path / "cache"))
    cfg = _fake_config(tmp_path)
    ident = snapshot.identity(cfg)
    assert ident["qemu_version"] == "QEMU emulator version 9.9.0"
    snap = Snapshot(tmp_path / "vm.snap", cfg, 1, None, tuple(sorted(ident.items())))
    snap.path.write_bytes(b"s")
    assert snapshot.usable(snap, cfg)
    assert not snapshot.usable(snap, cfg, ram="file")  # kind asked for differs
    dir0 = qemu_adapter.snapshot_dir(cfg)
    # an upgraded QEMU (same path, new binary) must not load the old snapshot
    os.utime(tmp_path / "bin" / "qemu-fake", ns=(1, 1))
    _fake_config(tmp_path, "10.0.0")
    assert snapshot.identity(cfg)["qemu_version"] == "QEMU emulator version 10.0.0"
    assert not snapshot.usable(snap, cfg)
    assert qemu_adapter.snapshot_dir(cfg) != dir0
    # so must a kernel or initrd rebuilt in place
    snap = Snapshot(snap.path, cfg, 1, None, tuple(sorted(snapshot.identity(cfg).items())))
    assert snapshot.usable(snap, cfg)
    (tmp_path / "initrd").write_bytes(b"y" * 65)
    assert not snapshot.usable(snap, cfg)
    # and a snapshot without an identity (made before it existed) is never reused
    assert not snapshot.usable(Snapshot(snap.path, cfg, 1), cfg)


def test_ram_file_command_line(tmp_path: Path) -> None:
    cfg = _fake_config(tmp_path)
    kw = {"socket_path": "/s", "qmp_path": "/q", "serial_log": "/l"}
    plain = cfg.argv(**kw)
    assert not any("memory-backend" in a for a in plain)
    clone = cfg.argv(**kw, incoming="defer", ram_file="/c/ram")
    machine = clone[clone.index("-M") + 1]
    assert machine.endswith(",memory-backend=ram0")
    assert f"memory-backend-file,id=ram0,size={cfg.memory_mb}M,mem-path=/c/ram,share=off" \
        in clone and clone[clone.index("-incoming") + 1] == "defer"
    template = cfg.argv(**kw, ram_file="/c/ram", ram_shared=True)
    assert any(a.endswith("mem-path=/c/ram,share=on") for a in template)
    with pytest.raises(Exception, match="comma"):
        cfg.argv(**kw, ram_file="/c/r,am")


def test_pool_size_from_env() -> None:
    assert pool_size_from_env({}) == 0  # opt-in: idle pooled VMMs show in memory samples
    assert pool_size_from_env({"CHAINBENCH_VM_POOL": "2"}) == 2
    assert pool_size_from_env({"CHAINBENCH_VM_POOL": "0"}) == 0
    for bad in ("-1", "x", "65"):
        with pytest.raises(ValueError, match="CHAINBENCH_VM_POOL"):
            pool_size_from_env({"CHAINBENCH_VM_POOL": bad})


# -- real QEMU ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def file_snapshot(config: VMConfig, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return asyncio.run(snapshot.ensure_snapshot(tmp_path_factory.mktemp("fsnap"), config,
                                                ram="file"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ram_mapping(pid: int, ram: Path) -> str:
    """The permissions of QEMU's mapping of the RAM file ('rw-p': private, copy-on-write)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith(str(ram)):
            return line.split()[1]
    return ""


@pytest.mark.integration
@pytest.mark.slow
def test_ram_file_clones_run_concurrently_and_never_write_the_template(
        config: VMConfig, file_snapshot: Snapshot, tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)
    snap = file_snapshot
    assert snap.ram is not None and snap.ram.stat().st_size == config.memory_mb << 20
    assert snap.size < 1 << 20  # device state only: the RAM is not in the stream
    assert Snapshot.load(snap.path.parent) == snap
    before = _sha(snap.ram)

    async def main() -> None:
        tracer = Tracer.from_dir(tmp_path / "trace", "sandboxer")
        clones = [MicroVM(f"f{i}", tmp_path / f"f{i}", config, tracer=tracer, pod=f"pod{i}",
                          call="RunPodSandbox") for i in range(2)]
        try:
            await clones[0].prespawn(snap)  # one from a pool, one spawned by restore
            assert clones[0].prespawned_for is snap
            await asyncio.gather(*(vm.restore(snap) for vm in clones))
            for vm in clones:
                assert vm.pid is not None and _ram_mapping(vm.pid, snap.ram) == "rw-p"
            # both guests write memory (processes, page cache) while alive at once
            await asyncio.gather(*(run_workload(vm, f"job{i}", 20 + i)
                                   for i, vm in enumerate(clones)))
            await asyncio.gather(*(run_workload(vm, f"again{i}", 3)
                                   for i, vm in enumerate(clones)))
            tracer.flush()
            steps = sorted((s["pod"], s["step"]) for s in read_spans(tmp_path / "trace"))
            assert steps == [("pod0", "agent.ready"), ("pod0", "vm.restore"),
                             ("pod1", "agent.ready"), ("pod1", "vm.restore")]
        finally:
            await asyncio.gather(*(vm.stop() for vm in clones))
        assert not processes.find_processes(under=tmp_path)
    asyncio.run(main())
    assert _sha(snap.ram) == before


@pytest.mark.integration
def test_prespawned_vm_stops_cleanly_without_a_restore(config: VMConfig, file_snapshot: Snapshot,
                                                       tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)

    async def main() -> None:
        vm = MicroVM("idle", tmp_path / "idle", config)
        await vm.prespawn(file_snapshot)
        pid = vm.pid
        assert vm.prespawned and pid is not None
        with pytest.raises(Exception, match="already started"):
            await vm.restore(replace(file_snapshot, size=file_snapshot.size + 1))
        assert vm.prespawned  # refused, not broken
        await vm.stop()
        assert vm.pid is None and not processes.find_processes(under=tmp_path)
        assert not Path(vm.socket_path).exists() and not Path(vm.qmp_path).exists()
    asyncio.run(main())


async def _until(pred, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.integration
@pytest.mark.slow
def test_sandboxer_pool_claims_refills_and_cleans_up(config: VMConfig, file_snapshot: Snapshot,
                                                     tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)
    pool_dir = tmp_path / "pool"

    async def main() -> None:
        b = VmBackend(Tracer(None, "t"), config=config, snapshot=file_snapshot, pool_size=2,
                      pool_dir=pool_dir)
        exits: list[tuple[str, int]] = []

        async def on_exit(sid: str, status: int) -> None:
            exits.append((sid, status))

        try:
            await b.prepare()
            await _until(lambda: len(b.pool) == 2)
            pooled = {vm.pid for vm in b.pool}
            assert all(_ram_mapping(p, file_snapshot.ram) == "rw-p" for p in pooled if p)
            sb = tmp_path / "sb1"
            sb.mkdir()
            assert all(os.getpriority(os.PRIO_PROCESS, p) == 10 for p in pooled if p)
            vm = await b.start("sb1", sb, "restore", on_exit)
            assert vm.pid in pooled and vm.workdir.parent.parent == pool_dir
            assert {os.getpriority(os.PRIO_PROCESS, int(t))
                    for t in os.listdir(f"/proc/{vm.pid}/task")} == {0}  # claimed: normal
            assert (vm.workdir / CLAIMED).read_text() == str(sb)
            link = sb / "agent.sock"
            assert link.is_symlink() and os.path.realpath(link) == vm.socket_path
            # the address handed out (the sandbox's socket) reaches the guest agent
            c = await Client.connect(str(link), timeout=10)
            try:
                r = await c.call(TASK_SERVICE, "Connect", pb.ConnectRequest(),
                                 pb.ConnectResponse, timeout=60)
                assert r.version.startswith("chainbench-agent")
            finally:
                await c.close()
            await _until(lambda: len(b.pool) == 2)  # refilled after the Start
            assert vm.pid not in {v.pid for v in b.pool}
            # a crash record names the sandbox's socket: kill_strays must find the pooled VMM
            assert b.record("sb1")["workdir"] == str(vm.workdir)
            await b.stop("sb1")
            assert not link.exists() and not vm.workdir.exists() and exits == []
        finally:
            await b.close(stop_vms=True)
        assert not pool_dir.exists()
        assert not processes.find_processes(under=tmp_path)
        assert not b.pool_registry.leftovers() and not b.registry.leftovers()
    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.slow
def test_pool_sweep_kills_unclaimed_vms_of_a_dead_sandboxer(config: VMConfig,
                                                             file_snapshot: Snapshot,
                                                             tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)
    pool_dir = tmp_path / "pool"
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names a sandboxer that is gone
    owner = pool_dir / f"{dead.pid}-1"

    async def main() -> None:
        left = MicroVM("pool-1", owner / "p1", config)
        claimed = MicroVM("pool-2", owner / "p2", config)
        b = VmBackend(Tracer(None, "t"), config=config, snapshot=file_snapshot, pool_size=0,
                      pool_dir=pool_dir)
        try:
            await asyncio.gather(left.prespawn(file_snapshot), claimed.prespawn(file_snapshot))
            (claimed.workdir / CLAIMED).write_text("/somewhere")
            await b.prepare()
            assert left.proc is not None
            assert await asyncio.wait_for(left.proc.wait(), 10) != 0  # killed by the sweep
            assert not (owner / "p1").exists()
            assert claimed.running() and (owner / "p2").is_dir()  # a sandbox's: left alone
        finally:
            await asyncio.gather(left.stop(), claimed.stop())
            await b.close(stop_vms=True)
    asyncio.run(main())
    assert not processes.find_processes(under=tmp_path)


def test_readiness_resends_connect_a_guest_left_unanswered(tmp_path: Path, monkeypatch,
                                                           leak_check) -> None:
    """An agent that drops a request (it saw the bytes before it saw the host connect) must
    cost a retry on a fresh connection, not the whole readiness timeout."""
    import bench.vm.qemu as qemu_mod
    from bench.rpc.ttrpc import Server
    monkeypatch.setattr(qemu_mod, "_ANSWER_S", 0.3)
    leak_check.watch_dir(tmp_path)
    cfg = _fake_config(tmp_path)

    async def main() -> None:
        calls: list[int] = []

        async def connect(req: pb.ConnectRequest, ctx) -> pb.ConnectResponse:
            calls.append(1)
            if len(calls) == 1:
                await asyncio.sleep(30)  # dropped: never answered
            return pb.ConnectResponse(version="stand-in")

        vm = MicroVM("r", tmp_path / "r", cfg)
        vm.workdir.mkdir(parents=True)
        server = Server()
        server.register(TASK_SERVICE, {"Connect": (pb.ConnectRequest, connect)})
        await server.start(vm.socket_path)
        # a real process stands in for QEMU: readiness watches that it stays alive
        vm.proc = await vm.registry.spawn("sleep", "60", role="vmm", label="stand-in")
        try:
            resp = await asyncio.wait_for(vm._agent_connect(), 10)
            assert resp.version == "stand-in" and len(calls) == 2
        finally:
            await server.close()
            vm.proc.kill()
            await vm.proc.wait()
            vm.registry.unregister(vm.proc.pid)
    asyncio.run(main())
