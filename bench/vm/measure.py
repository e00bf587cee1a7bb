"""Owns: the microVM readiness and memory measurement (`python -m bench.vm.measure`).

Boots N VMs cold one after another, makes one template snapshot (`--ram file|stream`, see
bench.vm.snapshot), restores N clones one after another twice — spawning QEMU in the restore
("restore_*") and into a QEMU prespawned beforehand as a pool does ("prespawned_*") — then K
clones alive at once, and prints JSON: readiness split into the VMM part (vm.boot / vm.restore)
and the agent part (agent.ready), the prespawn time, the QEMU CPU time of the agent part, and
each live clone's (and an idle prespawned QEMU's) PSS/RSS/USS from smaps_rollup.  Everything
it starts is stopped before it returns.
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

from bench.vm.qemu import MicroVM, VMConfig
from bench.vm.snapshot import DEFAULT_RAM, RAM_KINDS, create_snapshot


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "min": xs[0], "p50": statistics.median(xs), "max": xs[-1],
            "mean": statistics.fmean(xs)}


async def measure(workdir: Path, *, cold: int, restores: int, alive: int,
                  ram: str = DEFAULT_RAM) -> dict[str, Any]:
    cfg = VMConfig.default()
    out: dict[str, Any] = {"accel": cfg.accel, "memory_mb": cfg.memory_mb,
                           "kernel": cfg.kernel, "initrd": cfg.initrd,
                           "initrd_bytes": Path(cfg.initrd).stat().st_size}
    cold_t: list[tuple[float, float]] = []
    for i in range(cold):
        async with MicroVM(f"cold{i}", workdir / f"cold{i}", cfg) as vm:
            t = await vm.boot()
            cold_t.append((t.vmm_s, t.agent_s))
            if i == 0:
                mem = vm.memory()
                out["cold_pss_mb"] = mem.pss / 2**20 if mem else None
    if cold_t:
        out["cold_ready_s"] = _stats([a + b for a, b in cold_t])
        out["cold_vm_boot_s"] = _stats([a for a, _ in cold_t])
        out["cold_agent_ready_s"] = _stats([b for _, b in cold_t])
    t0 = time.monotonic()
    snap = await create_snapshot(workdir / "snap", cfg, ram=ram)
    out["snapshot_create_s"] = time.monotonic() - t0
    out["snapshot_ram"] = ram
    out["snapshot_bytes"] = snap.size
    for kind in ("restore", "prespawned"):
        rest_t: list[tuple[float, float, float, float]] = []
        for i in range(restores):
            async with MicroVM(f"{kind[0]}{i}", workdir / f"{kind[0]}{i}", cfg) as vm:
                t0 = time.monotonic()
                if kind == "prespawned":
                    await vm.prespawn(snap)
                    t1 = time.monotonic()
                    if i == 0:
                        mem = vm.memory()
                        out["prespawned_idle_pss_mb"] = mem.pss / 2**20 if mem else None
                        out["prespawned_idle_rss_mb"] = mem.rss / 2**20 if mem else None
                    await asyncio.sleep(0.2)  # idle in the pool, as between pods
                else:
                    t1 = t0
                cpu0 = _cpu_s(vm.pid)
                t = await vm.restore(snap)
                rest_t.append((t.vmm_s, t.agent_s, t1 - t0, _cpu_s(vm.pid) - cpu0))
        if rest_t:
            out[f"{kind}_ready_s"] = _stats([r[0] + r[1] for r in rest_t])
            out[f"{kind}_vm_restore_s"] = _stats([r[0] for r in rest_t])
            out[f"{kind}_agent_ready_s"] = _stats([r[1] for r in rest_t])
            out[f"{kind}_qemu_cpu_s"] = _stats([r[3] for r in rest_t])
            if kind == "prespawned":
                out["prespawn_s"] = _stats([r[2] for r in rest_t])
    vms = [MicroVM(f"a{i}", workdir / f"a{i}", cfg) for i in range(alive)]
    try:
        for vm in vms:
            await vm.restore(snap)
        await asyncio.sleep(1.0)  # let the clones settle after their first scheduling burst
        mems = [vm.memory() for vm in vms]
        out["alive_clones"] = alive
        out["clone_pss_mb"] = [round(m.pss / 2**20, 1) for m in mems if m]
        out["clone_rss_mb"] = [round(m.rss / 2**20, 1) for m in mems if m]
        out["clone_uss_mb"] = [round(m.uss / 2**20, 1) for m in mems if m]
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vm.measure", description=__doc__)
    ap.add_argument("--cold", type=int, default=3, help="cold boots, sequential")
    ap.add_argument("--restores", type=int, default=5, help="restores, sequential")
    ap.add_argument("--alive", type=int, default=3, help="clones alive at once for PSS")
    ap.add_argument("--ram", choices=RAM_KINDS, default=DEFAULT_RAM,
                    help="snapshot kind: RAM in a shared file (default) or in the stream")
    ap.add_argument("--workdir", help="default: a fresh temporary directory, removed after")
    ns = ap.parse_args(argv)
    tmp = Path(ns.workdir) if ns.workdir else Path(tempfile.mkdtemp(prefix="cb-vm-"))
    try:
        res = asyncio.run(measure(tmp, cold=ns.cold, restores=ns.restores, alive=ns.alive,
                                  ram=ns.ram))
    finally:
        if not ns.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    json.dump(res, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
