"""Tests against the real containerd-shim-runc-v2: start/delete protocol, Task API through
TaskClient, events, and cleanup after a killed shim."""
from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import uuid

import pytest
from google.protobuf import any_pb2

from bench import processes
from bench.rpc.pb import containerd_task_types_pb2 as types_pb
from bench.rpc.task_client import TaskClient, process_spec_any
from bench.rpc.ttrpc import Code, TtrpcError
from bench.runtimes import assets, oci
from bench.runtimes.shimv2 import (EventReceiver, ShimConfig, ShimError, adopt_shim,
                                   delete_shim, find_shim_daemon, start_shim)

NS = "cbtest"


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _cfg(tmp_path, registry=None) -> ShimConfig:
    return ShimConfig(namespace=NS, address=str(tmp_path / "engine.sock"),
                      ttrpc_address=str(tmp_path / "events.sock"), registry=registry)


def _no_container_procs(*ids: str) -> list[str]:
    return [f"{i}: pid {p.pid}" for i in ids
            for p in processes.find_processes(cgroup_contains=f"/chainbench/{i}")]


def _watch(leak_check, tmp_path, *ids):
    leak_check.watch_dir(tmp_path)
    for i in ids:
        leak_check.watch_cgroup(f"chainbench/{i}")


def test_full_pod_lifecycle_through_real_shim(tmp_path, leak_check):
    rootfs = str(assets.ensure_rootfs())
    pod, ctr = _uid("pod"), _uid("ctr")
    _watch(leak_check, tmp_path, pod, ctr)
    cfg = _cfg(tmp_path)

    async def main():
        events = await EventReceiver().start(cfg.ttrpc_address)
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        shim = await start_shim(cfg, pod, pb)
        leak_check.watch_socket(shim.socket_path)
        assert shim.address.startswith("unix:///run/containerd/s/")
        assert os.path.exists(shim.socket_path)
        assert shim.alive()
        assert find_shim_daemon(cfg, pod, pb) == shim.pid
        assert [t.role for t in processes.leftovers() if t.pid == shim.pid] == ["shim"]
        try:
            client = await TaskClient.connect(shim.address, namespace=NS)
            conn = await client.connect(id=pod)
            assert conn.shim_pid == shim.pid

            created = await client.create(id=pod, bundle=str(pb))
            assert created.pid > 0
            started = await client.start(id=pod)
            assert started.pid == created.pid
            st = await client.state(id=pod)
            assert st.status == types_pb.RUNNING and st.pid == created.pid
            assert st.bundle == str(pb)
            pids = await client.pids(id=pod)
            assert [p.pid for p in pids.processes] == [created.pid]

            # workload container in the same shim joining the pause's namespaces
            cb = oci.write_bundle(tmp_path / ctr, oci.container_spec(
                rootfs, ctr, ["sleep", "300"], join=oci.join_pod_namespaces(created.pid)))
            shim.track_container(ctr, cb)
            c = await client.create(id=ctr, bundle=str(cb))
            await client.start(id=ctr)
            assert (await client.state(id=ctr)).status == types_pb.RUNNING
            assert os.readlink(f"/proc/{c.pid}/ns/ipc") == \
                os.readlink(f"/proc/{created.pid}/ns/ipc")

            # exec into the workload, output through a FIFO as containerd does
            fifo = tmp_path / "exec.out"
            os.mkfifo(fifo)
            rfd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            try:
                await client.exec(id=ctr, exec_id="e1", stdout=str(fifo), stderr=str(fifo),
                                  spec=process_spec_any({
                                      "args": ["sh", "-c", "echo exec-ok"], "cwd": "/",
                                      "env": [oci.DEFAULT_PATH], "user": {"uid": 0, "gid": 0}}))
                await client.start(id=ctr, exec_id="e1")
                assert (await client.wait(id=ctr, exec_id="e1", timeout=10)).exit_status == 0
                await client.delete(id=ctr, exec_id="e1")
                data = b""
                for _ in range(200):
                    try:
                        data += os.read(rfd, 100)
                    except BlockingIOError:
                        pass
                    if data.endswith(b"\n"):
                        break
                    await asyncio.sleep(0.01)
                assert data == b"exec-ok\n"
            finally:
                os.close(rfd)

            with pytest.raises(TtrpcError) as ei:
                await client.state(id="no-such-container")
            assert ei.value.code == Code.NOT_FOUND

            await client.kill(id=ctr, signal=signal.SIGKILL)
            w = await client.wait(id=ctr, timeout=10)
            assert w.exit_status == 128 + signal.SIGKILL
            d = await client.delete(id=ctr)
            assert d.pid == c.pid and d.exit_status == 137
            shim.untrack_container(ctr)
            exit_ev = await events.wait_for(
                "/tasks/exit", lambda e: e.message.container_id == ctr and e.message.id == ctr)
            assert exit_ev.message.exit_status == 137 and exit_ev.namespace == NS

            await client.kill(id=pod, signal=signal.SIGTERM)
            assert (await client.wait(id=pod, timeout=10)).exit_status == 0
            await client.delete(id=pod)
            shim.untrack_container(pod)
            topics = [e.topic for e in events.history]
            assert topics.count("/tasks/create") == 2 and "/tasks/delete" in topics

            await client.shutdown(id=pod)
            await client.close()
            assert await shim.wait_exit(5.0)
        finally:
            leftovers = await shim.cleanup()
            await events.close()
        assert leftovers == []  # everything was deleted through the Task API
        assert not os.path.exists(shim.socket_path)
        assert (pb / "shim.log").exists()

    asyncio.run(main())
    assert _no_container_procs(pod, ctr) == []
    assert not glob.glob(f"/run/containerd/runc/{NS}/{pod}")


def test_killed_shim_is_cleaned_by_delete_action(tmp_path, leak_check):
    rootfs = str(assets.ensure_rootfs())
    pod, ctr = _uid("kpod"), _uid("kctr")
    _watch(leak_check, tmp_path, pod, ctr)
    cfg = _cfg(tmp_path)

    async def main():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        shim = await start_shim(cfg, pod, pb)
        leak_check.watch_socket(shim.socket_path)
        async with await TaskClient.connect(shim.address, namespace=NS) as client:
            p = await client.create(id=pod, bundle=str(pb))
            await client.start(id=pod)
            cb = oci.write_bundle(tmp_path / ctr, oci.container_spec(
                rootfs, ctr, ["sleep", "300"], join=oci.join_pod_namespaces(p.pid)))
            shim.track_container(ctr, cb)
            await client.create(id=ctr, bundle=str(cb))
            await client.start(id=ctr)
            shim.kill(signal.SIGKILL)
            assert await shim.wait_exit(5.0)
        # containers outlive their shim until the delete action runs
        assert _no_container_procs(pod, ctr) != []
        assert os.path.exists(shim.socket_path)
        results = await shim.cleanup()
        assert sorted(r.exit_status for r in results) == [137, 137]
        assert p.pid in [r.pid for r in results]
        assert not os.path.exists(shim.socket_path)
        assert processes.mounts_below(pb) == []

    asyncio.run(main())
    assert _no_container_procs(pod, ctr) == []


def test_registry_cleanup_handles_forgotten_shim(tmp_path, leak_check):
    """The atexit / signal path: a shim we never stopped is killed, its containers deleted."""
    rootfs = str(assets.ensure_rootfs())
    pod = _uid("fpod")
    _watch(leak_check, tmp_path, pod)
    reg = processes.ProcessRegistry("t")
    cfg = _cfg(tmp_path, registry=reg)

    async def main():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        shim = await start_shim(cfg, pod, pb)
        leak_check.watch_socket(shim.socket_path)
        async with await TaskClient.connect(shim.address, namespace=NS) as client:
            await client.create(id=pod, bundle=str(pb))
            await client.start(id=pod)
        return shim

    shim = asyncio.run(main())
    assert [t.role for t in reg.leftovers()] == ["shim"]
    reg.cleanup()
    assert reg.leftovers() == [] and reg.finalizers() == []
    assert not shim.alive()
    assert not os.path.exists(shim.socket_path)
    assert _no_container_procs(pod) == []


def test_delete_action_on_bundle_without_container(tmp_path, leak_check):
    pod = _uid("epod")
    _watch(leak_check, tmp_path, pod)
    cfg = _cfg(tmp_path)

    async def main():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(str(assets.ensure_rootfs()), pod))
        assert await delete_shim(cfg, pod, pb) is None
        shim = await start_shim(cfg, pod, pb)
        leak_check.watch_socket(shim.socket_path)
        assert await shim.cleanup() == []  # killed, nothing created, socket removed
        assert not os.path.exists(shim.socket_path)

    asyncio.run(main())


def test_start_errors(tmp_path, leak_check):
    leak_check.watch_dir(tmp_path)
    cfg = _cfg(tmp_path)

    async def main():
        with pytest.raises(ShimError, match="config.json"):
            await start_shim(cfg, "p1", tmp_path)
        with pytest.raises(oci.SpecError):
            await start_shim(cfg, "../p1", tmp_path)
        b = oci.write_bundle(tmp_path / "p2", oci.pause_spec("/r", "p2"))
        bad = ShimConfig(binary="/bin/false", namespace=NS, address=cfg.address,
                         ttrpc_address=cfg.ttrpc_address)
        with pytest.raises(ShimError, match="start failed"):
            await start_shim(bad, "p2", b)

    asyncio.run(main())


def test_adopt_running_shim_after_restart(tmp_path, leak_check):
    """An engine restart: a fresh handle (other event loop) finds the shim and cleans it."""
    rootfs = str(assets.ensure_rootfs())
    pod = _uid("apod")
    _watch(leak_check, tmp_path, pod)
    reg1 = processes.ProcessRegistry("before")
    cfg1 = _cfg(tmp_path, registry=reg1)

    async def first_life():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        shim = await start_shim(cfg1, pod, pb)
        leak_check.watch_socket(shim.socket_path)
        async with await TaskClient.connect(shim.address, namespace=NS) as client:
            await client.create(id=pod, bundle=str(pb))
            await client.start(id=pod)
        shim._drain.close()  # the old engine's fds die with it
        return shim, pb

    old, pb = asyncio.run(first_life())
    reg1.unregister(old.pid)  # "the old engine process is gone"
    reg1.release(old._token)

    async def second_life():
        cfg2 = _cfg(tmp_path)
        assert await adopt_shim(cfg2, "other-id", pb) is None
        shim = await adopt_shim(cfg2, pod, pb)
        assert shim is not None and shim.pid == old.pid and shim.address == old.address
        async with await TaskClient.connect(shim.address, namespace=NS) as client:
            assert (await client.state(id=pod)).status == types_pb.RUNNING
        results = await shim.cleanup(grace=0)
        assert [r.exit_status for r in results] == [137]

    asyncio.run(second_life())
    assert _no_container_procs(pod) == []


def test_task_control_calls(tmp_path, leak_check):
    """Stats, Pause/Resume, Update, CloseIO, ResizePty through TaskClient on the real shim."""
    rootfs = str(assets.ensure_rootfs())
    pod = _uid("cpod")
    _watch(leak_check, tmp_path, pod)
    cfg = _cfg(tmp_path)

    async def main():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        shim = await start_shim(cfg, pod, pb)
        leak_check.watch_socket(shim.socket_path)
        try:
            async with await TaskClient.connect(shim.address, namespace=NS) as client:
                await client.create(id=pod, bundle=str(pb))
                await client.start(id=pod)
                stats = await client.stats(id=pod)
                assert stats.stats.type_url == "io.containerd.cgroups.v1.Metrics"
                assert len(stats.stats.value) > 0
                await client.pause(id=pod)
                assert (await client.state(id=pod)).status == types_pb.PAUSED
                await client.resume(id=pod)
                assert (await client.state(id=pod)).status == types_pb.RUNNING
                await client.update(id=pod, resources=any_pb2.Any(
                    type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                    value=json.dumps({"cpu": {"shares": 256}}).encode()))
                shares = glob.glob(f"/sys/fs/cgroup/cpu/chainbench/{pod}/cpu.shares")
                assert [open(p).read().strip() for p in shares] == ["256"]
                await client.close_io(id=pod)
                await client.resize_pty(id=pod, width=80, height=24)
                with pytest.raises(TtrpcError) as ei:
                    await client.start(id=pod, exec_id="missing")
                assert ei.value.code == Code.NOT_FOUND
        finally:
            results = await shim.cleanup(grace=0)
        assert [r.exit_status for r in results] == [137]

    asyncio.run(main())
    assert _no_container_procs(pod) == []


def test_start_timeout_leaves_no_daemon(tmp_path, leak_check):
    """`start` that hangs after forking the daemon: the timeout kills both, removes the socket."""
    pod = _uid("tpod")
    _watch(leak_check, tmp_path, pod)
    wrapper = tmp_path / "slow-shim"
    wrapper.write_text("#!/bin/sh\n/usr/bin/containerd-shim-runc-v2 \"$@\"\nexec sleep 30\n")
    wrapper.chmod(0o755)
    cfg = ShimConfig(binary=str(wrapper), namespace=NS, address=str(tmp_path / "engine.sock"),
                     ttrpc_address=str(tmp_path / "events.sock"), timeout=1.5)

    async def main():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec("/r", pod))
        with pytest.raises(asyncio.TimeoutError):
            await start_shim(cfg, pod, pb)
        address = (pb / "address").read_text().strip()
        assert address.startswith("unix://")
        leak_check.watch_socket(address[len("unix://"):])
        assert find_shim_daemon(cfg, pod, pb) is None
        assert processes.find_processes(names=["sleep"], cmdline_contains=["30"],
                                        under=tmp_path) == []

    asyncio.run(main())
