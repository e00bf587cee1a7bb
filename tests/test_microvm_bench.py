"""Integration: a tiny microVM bench run (real QEMU, TCG here) on both chains — the shim chain
with our per-pod VM shim and the sandbox chain with the sandboxer's VM backend — writes run dirs
that `chainbench summary --json` reads, with the VMM memory reported apart from the management
memory, the VM spans in the run, and no qemu/shim/sandboxer process left behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import loaddriver, processes
from bench.chains import RUN_ROOT, run_leftovers
from reports.schema import load_run
import test_vmshim_qemu

snapshot = test_vmshim_qemu.snapshot  # kernel, initramfs and template snapshot, by name

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_microvm_seq_two_pods_on_both_chains(tmp_path, snapshot):
    out = tmp_path / "out"
    rc = loaddriver.main(["microvm-seq", "--chain", "shim,sandbox", "--out", str(out),
                          "--pods", "2", "--warmup", "0"])
    assert rc == 0
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "summary", str(out), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs = {r["chain"]: r for r in json.loads(proc.stdout)["runs"]}
    assert set(runs) == {"shim", "sandbox"}
    for chain, r in runs.items():
        assert r["flavor"] == "microvm" and r["errors"] == 0 and r["pods"] == 2
        assert r["run_pod_sandbox_ms"]["p50"] > 0
        # each live pod holds one QEMU of tens of MB; none of it counts as management
        assert r["vmm_pss_mb_per_pod"] > 10, (chain, r)
        run = load_run(out / chain)
        assert run.meta.host.accel in ("tcg", "kvm") and run.meta.extra["boot"] == "restore"
        top = run.memory[run.memory["pods_alive"] == 2]
        # one QEMU per live pod, plus the sandboxer's idle pool VMs (a constant, not per pod)
        pool = run.meta.extra.get("vm_pool", 0) if chain == "sandbox" else 0
        assert (top["role"] == "vmm").sum() == 2 + pool, (chain, pool)
        steps = set(run.spans["step"])
        assert {"vm.restore", "agent.ready", "task.create", "task.start"} <= steps, steps
        assert run.meta.extra["leftovers"] == []
        rid = run.meta.extra["run_id"]
        assert run_leftovers(RUN_ROOT / rid, rid) == []
    # the shim chain pays a shim process per pod; the sandbox chain none
    assert runs["shim"]["mgmt_procs_per_pod"] == pytest.approx(1.0)
    assert runs["sandbox"]["mgmt_procs_per_pod"] == pytest.approx(0.0)
    assert "shim.spawn" in set(load_run(out / "shim").spans["step"])
    assert "sandbox.start" in set(load_run(out / "sandbox").spans["step"])
    # QEMU and shim command lines name sockets below the run dir: none may be left
    for chain in runs:
        rid = load_run(out / chain).meta.extra["run_id"]
        assert not processes.find_processes(cmdline_contains=[f"/{rid}/"])
