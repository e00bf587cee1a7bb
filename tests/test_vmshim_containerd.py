"""Our microVM shim under a real containerd 1.6 (the private peer): the CRI plugin resolves
runtime type `io.containerd.chainbench-vm.v2` to `containerd-shim-chainbench-vm-v2` on PATH,
starts it with the shim v2 protocol, groups the pod's container into it, and tears it all down."""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from bench import processes
from bench.containerd_peer import BUSYBOX_REF, ContainerdPeer
from bench.cri_client import CriClient, container_config, pod_config
from bench.tracing import read_spans
from bench.vmshim.main import ensure_shim_binary
import test_vmshim_qemu

snapshot = test_vmshim_qemu.snapshot  # the kernel/initramfs/template fixture, by name

pytestmark = pytest.mark.integration


class _VmPeer(ContainerdPeer):
    """The peer plus one CRI runtime handler, `vm`, served by our shim."""

    def config_text(self) -> str:
        table = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vm]'
        return super().config_text() + \
            f'\n{table}\n  runtime_type = "io.containerd.chainbench-vm.v2"\n'


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["host", "qemu"])
def test_real_containerd_runs_a_pod_on_the_vm_shim(backend, request, monkeypatch, leak_check):
    if backend == "qemu":
        request.getfixturevalue("snapshot")
    rid = secrets.token_hex(4)
    base = Path(f"/run/chainbench/t{rid}")
    root = Path(tempfile.mkdtemp(prefix="vsc", dir="/tmp"))  # short: unix socket paths
    leak_check.watch_dir(base)
    leak_check.watch_dir(root)
    binary = ensure_shim_binary(root / "bin")
    # containerd finds shims on its PATH and passes its environment on to them
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("CHAINBENCH_VMSHIM_DIR", str(root / "rt"))
    monkeypatch.setenv("CHAINBENCH_VM_BACKEND", backend)
    monkeypatch.setenv("CHAINBENCH_VM_BOOT", "restore")
    monkeypatch.setenv("CHAINBENCH_TRACE_DIR", str(root / "trace"))

    async def main() -> str:
        peer = _VmPeer(base / "containerd")
        try:
            await peer.start()
            c = CriClient(peer.endpoint)
            try:
                cfg = pod_config("vp", f"uid-{rid}")
                pod = await c.run_pod_sandbox(cfg, handler="vm")
                shims = processes.find_processes(cmdline_contains=["bench.vmshim", pod])
                assert len(shims) == 1
                cid = await c.create_container(
                    pod, container_config("c0", BUSYBOX_REF, ["/bin/sleep", "3600"]), cfg)
                await c.start_container(cid)
                # the container joined the pod's shim: still one shim for the pod
                ours = processes.find_processes(cmdline_contains=["bench.vmshim", str(root)])
                assert [p.pid for p in ours] == [p.pid for p in shims]
                await c.stop_container(cid, 1)
                await c.remove_container(cid)
                await c.stop_pod_sandbox(pod)
                await c.remove_pod_sandbox(pod)
                assert await _until(lambda: not processes.find_processes(
                    cmdline_contains=["bench.vmshim", pod]))
            finally:
                await c.close()
            return pod
        finally:
            forced = await peer.stop()
            assert forced == []

    try:
        pod = asyncio.run(main())
        steps = {s["step"] for s in read_spans(root / "trace") if s["pod"] == pod}
        assert {"agent.ready", "task.create"} <= steps
        assert ("vm.restore" if backend == "qemu" else "vm.boot") in steps
        assert not any((root / "rt" / "s").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


async def _until(pred, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True
