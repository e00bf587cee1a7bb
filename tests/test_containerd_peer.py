"""Integration: a private real containerd 1.6 with locally built images, driven over CRI."""
from __future__ import annotations

import asyncio
import os
import json
import secrets
import subprocess
import tarfile

import pytest

from bench import probes
from bench.chains import cgroup_dirs, remove_cgroups
from bench.containerd_peer import (BUSYBOX_REF, PAUSE_REF, ContainerdPeer, ensure_images)
from bench.cri_client import CriClient, CriError, container_config, pod_config

pytestmark = pytest.mark.integration


def test_image_tarballs_are_docker_archives():
    images = ensure_images()
    assert set(images) == {PAUSE_REF, BUSYBOX_REF}
    for ref, tar in images.items():
        with tarfile.open(tar) as t:
            manifest = json.load(t.extractfile("manifest.json"))
            assert manifest[0]["RepoTags"] == [ref]
            config = json.load(t.extractfile(manifest[0]["Config"]))
            assert config["os"] == "linux" and config["rootfs"]["diff_ids"]
            layer = tarfile.open(fileobj=t.extractfile(manifest[0]["Layers"][0]))
            names = layer.getnames()
        assert ("pause" in names) if ref == PAUSE_REF else ("bin/busybox" in names)
    assert ensure_images() == images  # cached, same files


def test_peer_runs_a_pod_over_cri_and_leaves_nothing(leak_check):
    run_id = secrets.token_hex(4)
    base = f"/run/chainbench/t{run_id}/containerd"
    cgroup = f"/chainbench-t{run_id}/containerd"
    leak_check.watch_dir(f"/run/chainbench/t{run_id}")
    leak_check.watch_cgroup(f"chainbench-t{run_id}")

    async def scenario() -> tuple[list[str], list[str], dict[str, int]]:
        from pathlib import Path
        peer = ContainerdPeer(Path(base))
        roles: dict[str, int] = {}
        try:
            await peer.start()
            c = CriClient(peer.endpoint)
            v = await c.version()
            assert v.runtime_name == "containerd" and v.runtime_api_version == "v1"
            cfg = pod_config("p0", f"uid-{run_id}", cgroup_parent=cgroup)
            pod = await c.run_pod_sandbox(cfg, pod="p0")
            cid = await c.create_container(
                pod, container_config("c0", BUSYBOX_REF, ["/bin/sleep", "3600"]), cfg, pod="p0")
            await c.start_container(cid, pod="p0")
            assert cgroup_dirs(cgroup), "pod not placed in the private cgroup parent"
            scope = probes.ChainScope(daemons={peer.pid: "containerd"}, dirs=(base,),
                                      cgroup_parent=cgroup)
            for pid, (_, role) in probes.scope_processes(scope).items():
                roles[role] = roles.get(role, 0) + 1
            # a bad id is a clean gRPC error, not a hang
            with pytest.raises(CriError) as err:
                await c.start_container("no-such-container", pod="p0")
            assert err.value.code == "NOT_FOUND"
            await c.stop_container(cid, pod="p0")
            await c.remove_container(cid, pod="p0")
            await c.stop_pod_sandbox(pod, pod="p0")
            await c.remove_pod_sandbox(pod, pod="p0")
            assert await c.list_pod_sandbox_ids() == []
            calls = [s["call"] for s in c.spans]
            await c.close()
        finally:
            forced = await peer.stop()
        return forced, calls, roles

    try:
        forced, calls, roles = asyncio.run(scenario())
    finally:
        stuck = remove_cgroups(f"/chainbench-t{run_id}")
        if os.path.isdir(f"/run/chainbench/t{run_id}"):
            os.rmdir(f"/run/chainbench/t{run_id}")  # the peer owns only its sub-directory
    assert roles == {"containerd": 1, "shim": 1, "pause": 1, "container": 1}
    assert calls == ["RunPodSandbox", "CreateContainer", "StartContainer", "StartContainer",
                     "StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox"]
    assert forced == [], f"CRI teardown left {forced}"
    assert stuck == []
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert base not in out
