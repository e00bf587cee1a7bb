"""Tests of the async runc wrapper against the real runc (root)."""
from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest

from bench import processes
from bench.runtimes import assets, oci
from bench.runtimes.runc import Runc, RuncError


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _wait_status(r: Runc, cid: str, want: str) -> None:
    for _ in range(500):
        if (await r.state(cid))["status"] == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{cid} never {want}")


def test_pause_and_workload_lifecycle(tmp_path, leak_check):
    rootfs = str(assets.ensure_rootfs())
    r = Runc(root=str(tmp_path / "runc"))
    pod, ctr = _uid("pod"), _uid("ctr")
    leak_check.watch_dir(tmp_path)
    leak_check.watch_cgroup(f"chainbench/{pod}")
    leak_check.watch_cgroup(f"chainbench/{ctr}")

    async def main():
        pb = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        pid = await r.create(pod, pb)
        assert (await r.state(pod))["status"] == "created"
        await r.start(pod)
        st = await r.state(pod)
        assert st["status"] == "running" and st["pid"] == pid
        assert [c["id"] for c in await r.list()] == [pod]
        assert await r.ps(pod) == [pid]

        out = tmp_path / "ctr.out"
        cb = oci.write_bundle(tmp_path / ctr, oci.container_spec(
            rootfs, ctr, ["sh", "-c", "echo hello; exec sleep 300"],
            join=oci.join_pod_namespaces(pid)))
        cpid = await r.run(ctr, cb, stdout=str(out))
        assert (await r.state(ctr))["status"] == "running"
        assert os.readlink(f"/proc/{cpid}/ns/ipc") == os.readlink(f"/proc/{pid}/ns/ipc")
        assert os.readlink(f"/proc/{cpid}/ns/mnt") != os.readlink(f"/proc/{pid}/ns/mnt")
        for _ in range(200):
            if out.exists() and out.read_text():
                break
            await asyncio.sleep(0.01)
        assert out.read_text() == "hello\n"

        await r.kill(ctr, signal.SIGKILL)
        await _wait_status(r, ctr, "stopped")
        await r.delete(ctr)
        await r.kill(pod, signal.SIGTERM)  # pause exits 0 on SIGTERM
        await _wait_status(r, pod, "stopped")
        await r.delete(pod)
        assert await r.list() == []
        with pytest.raises(RuncError) as ei:
            await r.state(pod)
        assert ei.value.not_found

    asyncio.run(main())
    assert processes.REGISTRY.finalizers() == []


def test_errors_are_runc_errors(tmp_path, leak_check):
    r = Runc(root=str(tmp_path / "runc"))
    leak_check.watch_dir(tmp_path)

    async def main():
        with pytest.raises(RuncError, match="runc create failed"):
            await r.create("nobundle", tmp_path / "missing")
        bad = oci.write_bundle(tmp_path / "bad", oci.build_spec(oci.SpecOptions(
            args=["/does-not-exist"], root=str(assets.ensure_rootfs()),
            namespaces=[oci.Namespace("mount"), oci.Namespace("pid")],
            cgroups_path="/chainbench/badexec")))
        with pytest.raises(RuncError) as ei:
            await r.run("badexec", bad)
        assert "does-not-exist" in str(ei.value)
        assert await r.list() == []
        with pytest.raises(oci.SpecError):
            await r.state("../etc")

    asyncio.run(main())
    assert processes.REGISTRY.finalizers() == []


def test_registry_finalizer_deletes_forgotten_container(tmp_path, leak_check):
    rootfs = str(assets.ensure_rootfs())
    reg = processes.ProcessRegistry("t")
    r = Runc(root=str(tmp_path / "runc"), registry=reg)
    pod = _uid("lost")
    leak_check.watch_dir(tmp_path)
    leak_check.watch_cgroup(f"chainbench/{pod}")

    async def main():
        b = oci.write_bundle(tmp_path / pod, oci.pause_spec(rootfs, pod))
        return await r.run(pod, b)

    pid = asyncio.run(main())
    assert processes.process_start_ticks(pid) is not None
    reg.cleanup()
    assert not processes._pid_alive(pid)
    assert not os.path.exists(tmp_path / "runc" / pod)


def test_exec_update_stats_and_fd_stdio(tmp_path, leak_check):
    rootfs = str(assets.ensure_rootfs())
    r = Runc(root=str(tmp_path / "runc"), track_containers=False)
    cid = _uid("ex")
    leak_check.watch_dir(tmp_path)
    leak_check.watch_cgroup(f"chainbench/{cid}")

    async def main():
        b = oci.write_bundle(tmp_path / cid, oci.container_spec(rootfs, cid, ["sleep", "300"]))
        rfd, wfd = os.pipe()  # the container's stdout is a pipe *we* own, not runc's
        try:
            await r.run(cid, b, stdout=wfd, stderr=wfd)
            assert processes.REGISTRY.finalizers() == []  # track_containers=False
            pid = await r.exec(cid, {"args": ["sh", "-c", "echo from-exec"], "cwd": "/",
                                     "env": [oci.DEFAULT_PATH], "user": {"uid": 0, "gid": 0}},
                               pid_file=str(tmp_path / "exec.pid"), stdout=wfd, stderr=wfd)
            assert pid > 0
            os.close(wfd)
            wfd = -1
            data = await asyncio.get_running_loop().run_in_executor(None, os.read, rfd, 100)
            assert data == b"from-exec\n"
            await r.update(cid, {"cpu": {"shares": 300}})
            with open(f"/sys/fs/cgroup/cpu/chainbench/{cid}/cpu.shares") as fh:
                assert fh.read().strip() == "300"
            st = await r.stats(cid)
            assert st["type"] == "stats" and "memory" in st["data"]
        finally:
            if wfd >= 0:
                os.close(wfd)
            os.close(rfd)
            await r.delete(cid, force=True)

    asyncio.run(main())
