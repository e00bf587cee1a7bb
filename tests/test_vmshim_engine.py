"""The microVM shim chain end to end: the real engine (`chainbench engine`, ShimController)
launches our shim per pod through the shim v2 start protocol and drives a whole CRI pod and
container lifecycle through it, with the agent run on the host and with a restored QEMU microVM."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from bench import processes
from bench.cri_client import CriClient, container_config, pod_config
from bench.tracing import read_spans
from bench.vmshim.main import ensure_shim_binary
import test_vmshim_qemu

snapshot = test_vmshim_qemu.snapshot  # the kernel/initramfs/template fixture, by name


def _kill_strays(root: Path) -> None:
    """After a failure: agents first (SIGTERM: they stop their processes), then the rest."""
    for p in processes.find_processes(under=root, cmdline_contains=["bench.vm.agent"]):
        os.kill(p.pid, signal.SIGTERM)
    for p in processes.find_processes(under=root):
        if p.pid != os.getpid():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["host", "qemu"])
def test_engine_runs_a_pod_through_the_vm_shim(backend, request, leak_check):
    if backend == "qemu":
        request.getfixturevalue("snapshot")  # kernel, initramfs and template snapshot
    root = Path(tempfile.mkdtemp(prefix="vse", dir="/tmp"))  # short: unix socket paths
    leak_check.watch_dir(root)
    binary = ensure_shim_binary(root / "bin")
    (root / "engine.toml").write_text(f"""
listen = "{root}/engine.sock"
state_dir = "{root}/state"
trace_dir = "{root}/trace"
default_runtime = "vm"
trace_flush_s = 0.1
[runtimes.vm]
controller = "shim"
shim_binary = "{binary}"
""")
    env = {**os.environ, "CHAINBENCH_VMSHIM_DIR": f"{root}/rt", "CHAINBENCH_VM_BACKEND": backend,
           "CHAINBENCH_VM_BOOT": "restore", "CHAINBENCH_TRACE_DIR": f"{root}/trace"}
    chainbench = str(Path(sys.executable).with_name("chainbench"))

    async def main() -> str:
        with open(root / "engine.log", "wb") as log:
            engine = await processes.REGISTRY.spawn(
                chainbench, "engine", "--config", str(root / "engine.toml"), role="engine",
                stdin=asyncio.subprocess.DEVNULL, stderr=log, env=env)
        cri = CriClient(str(root / "engine.sock"))
        try:
            for _ in range(600):
                if (root / "engine.sock").exists() or engine.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            pc = pod_config("vm-pod", "uid-1")
            pod = await cri.run_pod_sandbox(pc)
            shims = processes.find_processes(cmdline_contains=["bench.vmshim", pod])
            assert len(shims) == 1 and shims[0].cwd.startswith(str(root / "state"))
            cid = await cri.create_container(pod, container_config("c1", "busybox",
                                                                   ["sleep", "300"]), pc)
            await cri.start_container(cid)
            await cri.stop_container(cid, 1)
            await cri.remove_container(cid)
            await cri.stop_pod_sandbox(pod)
            await cri.remove_pod_sandbox(pod)
            assert not processes.find_processes(cmdline_contains=["bench.vmshim", pod])
            assert not any((root / "rt" / "s").iterdir())
            return pod
        finally:
            await cri.close()
            engine.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(engine.wait(), 20)
            finally:
                processes.REGISTRY.unregister(engine.pid)
                if engine.returncode is None:
                    engine.kill()
                    await engine.wait()

    try:
        pod = asyncio.run(main())
        spans = [(s["step"], s["component"]) for s in read_spans(root / "trace")
                 if s["pod"] == pod and s["call"] == "RunPodSandbox"]
        boot = "vm.restore" if backend == "qemu" else "vm.boot"
        for want in [("shim.spawn", "engine"), (boot, "vmm"), ("agent.ready", "shim"),
                     ("task.create", "shim")]:
            assert want in spans, (want, spans)
    finally:
        _kill_strays(root)
        shutil.rmtree(root, ignore_errors=True)
