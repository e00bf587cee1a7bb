"""Owns: the shim's own cost figures (`python -m bench.vmshim.measure`): how long the shim v2
`start` action takes (until the daemon serves), and the round-trip overhead of the relay hop —
the same Task.State call sent through the shim and straight to the agent, interleaved so both
see the same machine load.

Uses the `host` VM backend (the real agent as a host process), so the figures are the shim's
alone, without QEMU.  With `--vms N` it also runs N pods on real QEMU microVMs per boot mode
(restore, cold) and reports the sandbox Create split into the shim's spans.  Prints JSON;
everything it starts is stopped before it returns.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.rpc.task_client import TaskClient
from bench.runtimes.shimv2 import ShimConfig, start_shim
from bench.vmshim import launch
from bench.vmshim.main import ensure_shim_binary


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "min": round(xs[0], 4), "p50": round(statistics.median(xs), 4),
            "p90": round(xs[int(0.9 * (len(xs) - 1))], 4), "max": round(xs[-1], 4)}


def _bundle(d: Path, name: str) -> Path:
    b = d / name
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"process": {"args": ["/pause"]}}))
    return b


async def measure(root: Path, *, starts: int, calls: int) -> dict[str, Any]:
    env = {"CHAINBENCH_VMSHIM_DIR": str(root / "rt"), "CHAINBENCH_VM_BACKEND": "host"}
    cfg = ShimConfig(binary=str(ensure_shim_binary(root / "bin")), namespace="measure",
                     address=str(root / "engine.sock"), ttrpc_address=str(root / "ev.sock"),
                     extra_env=env)
    out: dict[str, Any] = {"backend": "host"}
    start_ms: list[float] = []
    for i in range(starts):
        b = _bundle(root, f"s{i}")
        shim = await start_shim(cfg, f"s{i}", b)
        try:
            start_ms.append(shim.start_s * 1e3)
            async with await TaskClient.dial(shim.address, namespace="measure") as c:
                await c.shutdown(id=f"s{i}")
            await shim.wait_exit(10)
            shim.untrack_container(f"s{i}")
        finally:
            await shim.cleanup()
    out["start_ms"] = _stats(start_ms)

    b = _bundle(root, "rtt")
    shim = await start_shim(cfg, "rtt", b)
    try:
        via = await TaskClient.dial(shim.address, namespace="measure")
        t = time.perf_counter()
        await via.create(id="rtt", bundle=str(b))
        out["first_create_ms"] = round((time.perf_counter() - t) * 1e3, 2)
        await via.start(id="rtt")
        agent_addr = launch.read_state(b)["vm"]["agent"]
        direct = await TaskClient.dial(agent_addr, namespace="measure")
        for c in (via, direct):  # warm both paths
            for _ in range(50):
                await c.state(id="rtt")
        via_us: list[float] = []
        direct_us: list[float] = []
        for _ in range(calls):
            for c, acc in ((via, via_us), (direct, direct_us)):
                t0 = time.perf_counter_ns()
                await c.state(id="rtt")
                acc.append((time.perf_counter_ns() - t0) / 1e3)
        out["state_via_shim_us"] = _stats(via_us)
        out["state_direct_us"] = _stats(direct_us)
        out["relay_overhead_p50_us"] = round(statistics.median(via_us)
                                             - statistics.median(direct_us), 1)
        await direct.close()
        await via.kill(id="rtt", signal=9)
        await via.wait(id="rtt")
        await via.delete(id="rtt")
        await via.shutdown(id="rtt")
        await via.close()
        await shim.wait_exit(10)
        shim.untrack_container("rtt")
    finally:
        await shim.cleanup()
    out["loadavg"] = os.getloadavg()
    return out


async def measure_vms(root: Path, n: int) -> dict[str, Any]:
    from bench.tracing import read_spans
    from bench.vmshim import qemu_adapter
    cfg0 = qemu_adapter.vm_config()
    await qemu_adapter.ensure_snapshot(cfg0)  # made once, outside the figures
    out: dict[str, Any] = {"accel": cfg0.accel}
    for boot in ("restore", "cold"):
        trace = root / f"trace-{boot}"
        env = {"CHAINBENCH_VMSHIM_DIR": str(root / "rt"), "CHAINBENCH_VM_BACKEND": "qemu",
               "CHAINBENCH_VM_BOOT": boot, "CHAINBENCH_TRACE_DIR": str(trace)}
        cfg = ShimConfig(binary=str(ensure_shim_binary(root / "bin")), namespace="measure",
                         address=str(root / "engine.sock"), ttrpc_address=str(root / "ev.sock"),
                         extra_env=env)
        create_ms: list[float] = []
        for i in range(n):
            pod = f"{boot}{i}"
            b = _bundle(root, pod)
            shim = await start_shim(cfg, pod, b)
            try:
                async with await TaskClient.dial(shim.address, namespace="measure",
                                                 timeout=120) as c:
                    t = time.perf_counter()
                    await c.create(id=pod, bundle=str(b))
                    create_ms.append((time.perf_counter() - t) * 1e3)
                    await c.start(id=pod)
                    await c.kill(id=pod, signal=9)
                    await c.wait(id=pod)
                    await c.delete(id=pod)
                    await c.shutdown(id=pod)
                await shim.wait_exit(20)
                shim.untrack_container(pod)
            finally:
                await shim.cleanup()
        res: dict[str, Any] = {"sandbox_create_ms": _stats(create_ms)}
        spans = read_spans(trace)
        for step in ("vm.restore", "vm.boot", "agent.ready", "task.create"):
            xs = [(s["end_ns"] - s["start_ns"]) / 1e6 for s in spans if s["step"] == step]
            if xs:
                res[f"{step}_ms"] = _stats(xs)
        out[boot] = res
    out["loadavg"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vmshim.measure", description=__doc__)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--vms", type=int, default=0, help="QEMU pods per boot mode (0 = none)")
    ns = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vsm", dir="/tmp"))  # short: socket paths
    try:
        res = asyncio.run(measure(root, starts=ns.starts, calls=ns.calls))
        if ns.vms:
            res["qemu"] = asyncio.run(measure_vms(root, ns.vms))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    json.dump(res, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
