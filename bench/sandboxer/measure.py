"""Owns: a quick stand-alone measurement of the sandboxer alone (no engine): Controller
Create/Start latency per pod and the sandboxer's memory growth per pod.

    python -m bench.sandboxer.measure --pods 20 [--containers] [--concurrency 1]
                                      [--schema current] [--pod-network]

Pods are host-network unless --pod-network (then ipc+uts+net are pinned).  Memory is read
from /proc/<sandboxer>/smaps_rollup before the first and after the last pod (after one
warm-up pod): USS (private pages) is the stable figure; PSS also moves when other processes
sharing the interpreter's pages come and go.  Everything is torn down at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2

from bench.rpc.pb import containerd_types_pb2 as ct
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.schemas import SANDBOX_SCHEMAS, ControllerStub
from bench.rpc.task_client import TaskClient
from bench.sandboxer.harness import SandboxerProcess


@dataclass
class Result:
    create_ms: list[float] = field(default_factory=list)
    start_ms: list[float] = field(default_factory=list)
    container_ms: list[float] = field(default_factory=list)
    mem_before: dict[str, int] = field(default_factory=dict)
    mem_after: dict[str, int] = field(default_factory=dict)


def memory_kb(pid: int) -> dict[str, int]:
    out = {"pss": 0, "uss": 0, "rss": 0}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key == "Pss":
                out["pss"] = int(rest.split()[0])
            elif key == "Rss":
                out["rss"] = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += int(rest.split()[0])
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _run(s: SandboxerProcess, pods: int, containers: bool, concurrency: int,
               host_network: bool) -> Result:
    from bench.runtimes import assets, oci

    legacy = s.schema == "legacy"
    pb = __import__("bench.rpc.pb.sandbox_legacy_pb2" if legacy else
                    "bench.rpc.pb.sandbox_current_pb2", fromlist=["x"])
    rootfs = str(assets.ensure_rootfs()) if containers else ""
    res = Result()
    async with grpc.aio.insecure_channel(s.target) as ch:
        st = ControllerStub(ch, s.schema)

        async def pod(i: int, record: bool) -> str:
            sid = f"m{i}-{uuid.uuid4().hex[:8]}"
            cfg = cri.PodSandboxConfig()
            cfg.metadata.name = sid
            if host_network:
                cfg.linux.security_context.namespace_options.network = cri.NODE
            t0 = time.perf_counter()
            await st.Create(pb.ControllerCreateRequest(
                sandbox_id=sid, options=any_pb2.Any(value=cfg.SerializeToString())))
            t1 = time.perf_counter()
            r = await st.Start(pb.ControllerStartRequest(sandbox_id=sid))
            t2 = time.perf_counter()
            if containers:
                cid = f"mc{i}-{uuid.uuid4().hex[:8]}"
                spec = oci.container_spec(rootfs, cid, ["sleep", "100000"])
                if legacy:
                    bundle = (await st.Prepare(pb.PrepareRequest(
                        sandbox_id=sid, container_id=cid,
                        spec=any_pb2.Any(value=json.dumps(spec).encode())))).bundle
                else:
                    sb = ct.Sandbox(sandbox_id=sid)
                    sb.extensions["tasks"].value = json.dumps(
                        {"tasks": [{"task_id": cid, "spec": spec}]}).encode()
                    await st.Update(pb.ControllerUpdateRequest(
                        sandbox_id=sid, sandbox=sb, fields=["extensions.tasks"]))
                    bundle = ""
                async with await TaskClient.dial(r.task_address if legacy else r.address) as tc:
                    await tc.create(id=cid, bundle=bundle)
                    await tc.start(id=cid)
                if record:
                    res.container_ms.append((time.perf_counter() - t2) * 1e3)
            if record:
                res.create_ms.append((t1 - t0) * 1e3)
                res.start_ms.append((t2 - t1) * 1e3)
            return sid

        warm = await pod(-1, False)
        await st.Shutdown(pb.ControllerShutdownRequest(sandbox_id=warm))
        await asyncio.sleep(0.3)
        res.mem_before = memory_kb(s.pid)
        sem = asyncio.Semaphore(concurrency)

        async def limited(i: int) -> str:
            async with sem:
                return await pod(i, True)

        ids = await asyncio.gather(*(limited(i) for i in range(pods)))
        await asyncio.sleep(0.3)
        res.mem_after = memory_kb(s.pid)
        for sid in ids:
            await st.Stop(pb.ControllerStopRequest(sandbox_id=sid))
            await st.Shutdown(pb.ControllerShutdownRequest(sandbox_id=sid))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sandboxer.measure")
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--containers", action="store_true", help="one sleep container per pod")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--schema", choices=sorted(SANDBOX_SCHEMAS), default="current")
    ap.add_argument("--pod-network", action="store_true")
    a = ap.parse_args(argv)
    s = SandboxerProcess(a.schema).start()
    try:
        res = asyncio.run(_run(s, a.pods, a.containers, a.concurrency, not a.pod_network))
    finally:
        s.stop()
        left = s.leftovers()
        s.teardown()

    def line(name: str, xs: list[float]) -> str:
        return (f"{name:<28} p50 {statistics.median(xs):7.2f} ms  p90 {_pct(xs, 0.9):7.2f}  "
                f"min {min(xs):6.2f}  max {max(xs):7.2f}")

    print(f"sandboxer alone: {a.pods} pods, schema {a.schema}, concurrency {a.concurrency}, "
          f"{'pod' if a.pod_network else 'host'} network, containers: {a.containers}")
    print(line("Controller.Create", res.create_ms))
    print(line("Controller.Start", res.start_ms))
    print(line("Create+Start", [c + s_ for c, s_ in zip(res.create_ms, res.start_ms)]))
    if res.container_ms:
        print(line("announce+Task.Create+Start", res.container_ms))
    for k in ("uss", "pss", "rss"):
        b, e = res.mem_before[k], res.mem_after[k]
        print(f"{k.upper():<4} {b} kB -> {e} kB: {(e - b) / a.pods:7.1f} kB/pod")
    print(f"leftovers after teardown: {left}")
    return 0 if not any(left.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
