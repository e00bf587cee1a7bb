"""Owns: the micro-benchmark of pause-container start paths (not a test: timings only).

Compares, sequentially and with full cleanup between rounds:
  shim path — `start_shim` (start action + daemon discovery), ttrpc dial + Connect,
              Task Create + Start of the pause;
  runc path — `runc create` + `runc start`, and `runc run -d`, of the same pause bundle.

    python -m bench.runtimes.measure [-n 20] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.rpc.task_client import TaskClient
from bench.runtimes import assets, oci
from bench.runtimes.runc import Runc
from bench.runtimes.shimv2 import ShimConfig, start_shim


def _stats(xs: list[float]) -> dict[str, float]:
    ys = sorted(xs)
    return {"median_ms": statistics.median(ys) * 1e3,
            "p90_ms": ys[min(len(ys) - 1, int(0.9 * len(ys)))] * 1e3,
            "min_ms": ys[0] * 1e3}


async def _shim_round(base: Path, rootfs: str, cfg: ShimConfig) -> dict[str, float]:
    pod = f"m-{uuid.uuid4().hex[:8]}"
    b = oci.write_bundle(base / pod, oci.pause_spec(rootfs, pod))
    t0 = time.perf_counter()
    shim = await start_shim(cfg, pod, b, log_path=None)
    t1 = time.perf_counter()
    client = await TaskClient.connect(shim.address, namespace=cfg.namespace)
    await client.connect(id=pod)
    t2 = time.perf_counter()
    await client.create(id=pod, bundle=str(b))
    t3 = time.perf_counter()
    await client.start(id=pod)
    t4 = time.perf_counter()
    await client.kill(id=pod, signal=signal.SIGKILL)
    await client.wait(id=pod, timeout=10)
    await client.delete(id=pod)
    shim.untrack_container(pod)
    await client.shutdown(id=pod)
    await client.close()
    await shim.cleanup(grace=2.0)
    shutil.rmtree(b)
    return {"shim_start_action": shim.start_s, "shim_start": t1 - t0,
            "dial_connect": t2 - t1, "task_create": t3 - t2, "task_start": t4 - t3,
            "create_start_via_shim": t4 - t2, "total_via_shim": t4 - t0}


async def _runc_round(base: Path, rootfs: str, r: Runc) -> dict[str, float]:
    out = {}
    for mode in ("create_start", "run"):
        pod = f"m-{uuid.uuid4().hex[:8]}"
        b = oci.write_bundle(base / pod, oci.pause_spec(rootfs, pod))
        t0 = time.perf_counter()
        if mode == "run":
            await r.run(pod, b)
        else:
            await r.create(pod, b)
            await r.start(pod)
        out[f"runc_{mode}"] = time.perf_counter() - t0
        await r.delete(pod, force=True)
        shutil.rmtree(b)
    return out


async def measure(n: int) -> dict[str, dict[str, float]]:
    rootfs = str(assets.ensure_rootfs())
    base = Path(tempfile.mkdtemp(prefix="chainbench-measure-"))
    try:
        cfg = ShimConfig(namespace="cbmeasure", address=str(base / "engine.sock"),
                         ttrpc_address=str(base / "events.sock"))
        r = Runc(root=str(base / "runc"))
        samples: dict[str, list[float]] = {}
        for i in range(n + 2):
            rnd = {**await _shim_round(base, rootfs, cfg), **await _runc_round(base, rootfs, r)}
            if i < 2:
                continue  # warm-up: page cache, first fork of the Go binaries
            for k, v in rnd.items():
                samples.setdefault(k, []).append(v)
        return {k: _stats(v) for k, v in samples.items()}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.runtimes.measure")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = asyncio.run(measure(args.n))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, s in res.items():
            print(f"{k:24s} median {s['median_ms']:7.2f} ms  p90 {s['p90_ms']:7.2f}  "
                  f"min {s['min_ms']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
