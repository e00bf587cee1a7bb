"""Owns: synthetic run directories for analysis tests (seeded, realistic shapes, any chain).

These stand in for bench/sim output until the testbed and the simulator write real runs.  The
numbers follow what the design measured on the 2-core machine (runc pause ~20 ms, shim start
~6 ms, a QEMU microVM boot ~0.9 s under TCG) so figures look like the real thing; every value is
drawn from a seeded numpy generator so a test is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from reports.schema import HostFacts, RunMeta, write_run
from sim.vocabulary import CALL_RUN_POD, RUN_POD_STEPS

MB = 1024 * 1024

# Median step costs in ms; the step order comes from the vocabulary.
STEP_MS: dict[str, float] = {
    "cri.recv": 0.08,
    "engine.prepare": 1.4,
    "shim.launch": 1.5,
    "shim.spawn": 4.5,
    "task.connect": 0.5,
    "task.create": 22.0,
    "task.start": 3.0,
    "engine.commit": 0.6,
    "cri.reply": 0.05,
    "sandbox.create": 1.1,
    "sandbox.start": 11.0,
    "vm.boot": 850.0,
    "agent.ready": 25.0,
}
# Median per-pod container and teardown costs in ms per chain.
CREATE_START_MS = {"shim": 30.0, "sandbox": 27.0, "containerd": 45.0}
STOP_REMOVE_MS = {"shim": 24.0, "sandbox": 14.0, "containerd": 60.0}
CONTAINERD_RUNPOD_MS = 75.0  # the peer has no spans of ours: only its client latency


@dataclass
class FixtureSpec:
    chain: str = "shim"
    flavor: str = "runc"
    source: str = "bench"
    scenario: str = "runc-c4"
    pods: int = 40
    concurrency: int = 4
    warmup: int = 3
    seed: int = 0
    slowdown: float = 1.0  # multiplies every RunPodSandbox step (and so the latency)
    step_slowdown: dict[str, float] = field(default_factory=dict)
    errors: int = 0  # pods (after warm-up) that fail
    accel: str = "tcg"
    commit: str = "abc123def456"


def _host(spec: FixtureSpec) -> HostFacts:
    return HostFacts(
        kernel="6.1.0-test-amd64",
        cpu="Synthetic CPU @ 2.0GHz",
        cores=2,
        accel=spec.accel,
        versions={"runc": "1.1.5", "containerd": "1.6.20", "qemu": "7.2.0"},
        commit=spec.commit,
    )


def make_run(out_dir: str | Path, spec: FixtureSpec | None = None, **kw: object) -> Path:
    """Write one synthetic run directory; keyword arguments override FixtureSpec fields."""
    spec = spec or FixtureSpec()
    for k, v in kw.items():
        if not hasattr(spec, k):
            raise TypeError(f"unknown fixture field {k!r}")
        setattr(spec, k, v)
    rng = np.random.default_rng(spec.seed)
    n = spec.pods
    # Contention on two cores: concurrency inflates every step a little.
    contention = 1.0 + 0.12 * (spec.concurrency - 1)
    pod_noise = rng.lognormal(0.0, 0.12, n)

    steps = RUN_POD_STEPS.get((spec.chain, spec.flavor), ())
    durations_ms = np.zeros((n, len(steps)))
    for j, ref in enumerate(steps):
        med = STEP_MS[ref.step] * spec.step_slowdown.get(ref.step, 1.0)
        durations_ms[:, j] = med * rng.lognormal(0.0, 0.25, n)
    durations_ms *= (contention * spec.slowdown * pod_noise)[:, None]
    if steps:
        client_overhead = rng.lognormal(np.log(0.3), 0.2, n)
        latency_ms = durations_ms.sum(axis=1) + client_overhead
    else:
        latency_ms = CONTAINERD_RUNPOD_MS * contention * spec.slowdown * pod_noise
        latency_ms = latency_ms * rng.lognormal(0.0, 0.2, n)
    if spec.warmup:
        latency_ms[: spec.warmup] *= 1.8  # cold caches: why warm-up is excluded

    # Closed-loop load: `concurrency` clients, each submits its next pod when the last returns.
    slots = np.zeros(spec.concurrency)
    submit = np.zeros(n)
    for i in range(n):
        k = int(np.argmin(slots))
        submit[i] = slots[k] + 0.0002
        slots[k] = submit[i] + latency_ms[i] / 1e3
    ready = submit + latency_ms / 1e3

    failed = set(range(spec.warmup, spec.warmup + spec.errors))
    pods, spans = [], []
    t0_ns = 1_000_000_000_000
    cs = CREATE_START_MS[spec.chain] * contention * spec.slowdown * rng.lognormal(0, 0.2, n)
    sr = STOP_REMOVE_MS[spec.chain] * contention * spec.slowdown * rng.lognormal(0, 0.2, n)
    for i in range(n):
        name = f"pod-{i:04d}"
        bad = i in failed
        pods.append({
            "pod": name,
            "submit_s": float(submit[i]),
            "ready_s": float(ready[i]),
            "latency_s": float(latency_ms[i] / 1e3),
            "create_start_s": float("nan") if bad else float(cs[i] / 1e3),
            "stop_remove_s": float("nan") if bad else float(sr[i] / 1e3),
            "outcome": "error" if bad else "ok",
            "error": "injected failure" if bad else "",
            "warmup": i < spec.warmup,
        })
        t = t0_ns + int(submit[i] * 1e9) + 150_000
        for j, ref in enumerate(steps):
            d = int(durations_ms[i, j] * 1e6)
            spans.append({
                "pod": name, "call": CALL_RUN_POD, "step": ref.step,
                "component": ref.component, "start_ns": t, "end_ns": t + d,
            })
            t += d + 5_000

    memory = _memory_rows(spec, rng, float(ready[-1]))
    cpu = [{"role": r["role"], "pid": r["pid"], "cpu_s": float(rng.uniform(0.01, 0.2))}
           for r in memory if r["t_s"] == memory[-1]["t_s"]]
    meta = RunMeta(
        scenario=spec.scenario, source=spec.source, chain=spec.chain, flavor=spec.flavor,
        scenario_digest="sha256:synthetic", pods=n, concurrency=spec.concurrency,
        containers_per_pod=1, warmup_pods=spec.warmup, t0_ns=t0_ns,
        started_at="2026-11-29T09:00:00Z", host=_host(spec),
    )
    return write_run(out_dir, meta, pods=pods, spans=spans, memory=memory, cpu=cpu)


def _memory_rows(spec: FixtureSpec, rng: np.random.Generator, t_end: float) -> list[dict]:
    """Memory samples at 0, quartiles and all pods alive, per process of each role."""
    n = spec.pods
    points = sorted({0, n // 4, n // 2, (3 * n) // 4, n})
    rows: list[dict] = []

    def proc(t: float, role: str, pid: int, pss_mb: float, alive: int, threads: int) -> None:
        pss = int(pss_mb * MB * rng.normal(1.0, 0.01))
        rows.append({"t_s": t, "role": role, "pid": pid, "rss": int(pss * 1.6),
                     "pss": pss, "uss": int(pss * 0.8), "threads": threads, "pods_alive": alive})

    for k, alive in enumerate(points):
        t = t_end * k / max(1, len(points) - 1)
        daemon = "containerd" if spec.chain == "containerd" else "engine"
        proc(t, daemon, 100, 32.0 + 0.04 * alive, alive, 12)
        if spec.chain == "sandbox":
            proc(t, "sandboxer", 200, 24.0 + 0.55 * alive, alive, 8)
        for p in range(alive):
            if spec.chain in ("shim", "containerd"):
                proc(t, "shim", 1000 + p, 7.5 if spec.chain == "containerd" else 8.8, alive, 11)
                if spec.flavor == "runc":
                    proc(t, "pause", 5000 + p, 0.25, alive, 1)
            if spec.flavor == "microvm":
                proc(t, "vmm", 9000 + p, 78.0, alive, 4)
    return rows


def make_session(
    out_dir: str | Path, chains: Iterable[str] = ("shim", "sandbox"), **kw: object
) -> Path:
    """A bench output directory holding one run per chain (DIR/shim, DIR/sandbox, ...)."""
    base = Path(out_dir)
    seed = int(kw.pop("seed", 0))  # type: ignore[arg-type]
    for i, chain in enumerate(chains):
        make_run(base / chain, chain=chain, seed=seed * 101 + i, **kw)
    return base
