"""Owns: the prior step costs — plausible, unmeasured values used until bench runs exist.

Numbers follow DESIGN §7 facts for this kind of host (2 cores, Debian 12, TCG): shim `start`
~6 ms, `runc run` of a pause container ~20 ms, microVM cold boot ~0.9 s vs ~0.09 s restored,
~77 MiB PSS per restored VM vs ~112 MiB cold, guest fork+exec ~8 ms under TCG.  Fork/exec-heavy
steps (shim start, runc) are taken as ~90% CPU: on the testbed they slow down with concurrency
about as processor sharing of 2 cores predicts.  Everything built from this table is marked
`"provenance": "prior (not measured)"`.
"""
from __future__ import annotations

from sim.chains import ChainModel, Dist, MemoryItem, Step, shape
from sim.vocabulary import CALL_RUN_POD

MIB = 1024 * 1024
PROVENANCE = "prior (not measured)"

# step -> (median ms, cpu fraction); (chain, flavor, call, step) entries override.
_STEP_MS: dict[str, tuple[float, float]] = {
    "cri.recv": (0.3, 0.9),
    "cri.reply": (0.2, 0.9),
    "engine.prepare": (1.5, 0.6),
    "engine.commit": (0.8, 0.5),
    "task.connect": (0.5, 0.5),
    "shim.launch": (1.5, 0.9),
    "shim.spawn": (4.5, 0.9),
    "task.create": (22.0, 0.9),
    "task.start": (4.0, 0.9),
    "task.kill": (1.0, 0.5),
    "task.wait": (5.0, 0.1),
    "task.delete": (12.0, 0.9),
    "shim.shutdown": (2.0, 0.3),
    "shim.delete": (15.0, 0.9),
    "sandbox.create": (1.0, 0.7),
    "sandbox.start": (5.0, 0.9),
    "sandbox.update": (0.8, 0.7),
    "sandbox.stop": (4.0, 0.5),
    "sandbox.wait": (1.0, 0.2),
    "sandbox.shutdown": (5.0, 0.8),
    "vm.boot": (900.0, 0.95),
    "vm.restore": (90.0, 0.8),
    "agent.ready": (5.0, 0.3),
}
_OVERRIDE_MS: dict[tuple[str, str, str, str], tuple[float, float]] = {
    # runc create of the pause container (runc run ~20 ms) and its start
    ("shim", "runc", CALL_RUN_POD, "task.create"): (20.0, 0.9),
    ("shim", "runc", CALL_RUN_POD, "task.start"): (3.0, 0.9),
    # our microVM shim is a Python process: interpreter start dominates its spawn
    ("shim", "microvm", CALL_RUN_POD, "shim.spawn"): (120.0, 0.9),
    ("shim", "microvm", CALL_RUN_POD, "task.create"): (15.0, 0.8),
    ("shim", "microvm", CALL_RUN_POD, "task.start"): (8.0, 0.8),
}
# Inside the guest under TCG (~11x slower, fork+exec ~8 ms)
_AGENT_MS: dict[str, tuple[float, float]] = {
    "task.create": (30.0, 0.9), "task.start": (10.0, 0.9), "task.kill": (2.0, 0.8),
    "task.wait": (8.0, 0.3), "task.delete": (12.0, 0.9),
}
SIGMA = 0.25
SIGMA_BOOT = 0.1

NODE = {"cores": 2, "engine_workers": 1, "sandboxer_workers": 1, "vmm_boots": 2}
BASE_MEMORY = {
    "engine": {"pss": 45 * MIB, "rss": 52 * MIB, "uss": 40 * MIB, "threads": 4},
    "sandboxer": {"pss": 38 * MIB, "rss": 45 * MIB, "uss": 33 * MIB, "threads": 3},
}


def _cost(chain: str, flavor: str, call: str, step: str, component: str) -> tuple[float, float]:
    if component == "agent" and step in _AGENT_MS:
        return _AGENT_MS[step]
    return _OVERRIDE_MS.get((chain, flavor, call, step), _STEP_MS[step])


def prior_chain(chain: str, flavor: str) -> tuple[ChainModel, dict[str, Step]]:
    """The prior model of one chain and its boot alternative (vm.restore for vm.boot)."""
    calls: dict[str, tuple[Step, ...]] = {}
    for call, steps in shape(chain, flavor).items():
        out = []
        for step, comp, limit, hold_is_cpu in steps:
            ms, cpu = _cost(chain, flavor, call, step, comp)
            sigma = SIGMA_BOOT if step.startswith("vm.") else SIGMA
            out.append(Step(call=call, step=step, component=comp,
                            dist=Dist("lognormal", median_s=ms / 1e3, sigma=sigma), cpu=cpu,
                            limit=limit, hold=cpu if hold_is_cpu else 1.0))
        calls[call] = tuple(out)
    alternatives: dict[str, Step] = {}
    mem: list[MemoryItem] = []
    if chain == "shim":
        spawn_mib = (6, 12, 5, 11) if flavor == "runc" else (18, 28, 14, 3)
        mem.append(MemoryItem("shim", f"{CALL_RUN_POD}/shim.spawn", pss=spawn_mib[0] * MIB,
                              rss=spawn_mib[1] * MIB, uss=spawn_mib[2] * MIB,
                              threads=spawn_mib[3]))
        if flavor == "runc":
            mem.append(MemoryItem("pause", f"{CALL_RUN_POD}/task.start", pss=150 * 1024,
                                  rss=512 * 1024, uss=100 * 1024, threads=1))
    else:
        growth = 300 * 1024 if flavor == "microvm" else 150 * 1024
        mem.append(MemoryItem("sandboxer", f"{CALL_RUN_POD}/sandbox.start", pss=growth,
                              rss=growth, uss=growth, shared=True))
    if flavor == "microvm":
        boot_step = next(s for s in calls[CALL_RUN_POD] if s.step == "vm.boot")
        ms, cpu = _STEP_MS["vm.restore"]
        alternatives["vm.restore"] = Step(call=CALL_RUN_POD, step="vm.restore",
                                          component=boot_step.component,
                                          dist=Dist("lognormal", median_s=ms / 1e3,
                                                    sigma=SIGMA_BOOT),
                                          cpu=cpu, limit=boot_step.limit, hold=1.0)
        mem.append(MemoryItem("vmm", f"{CALL_RUN_POD}/vm.boot", pss=112 * MIB, rss=128 * MIB,
                              uss=100 * MIB, threads=4, boot="cold"))
        mem.append(MemoryItem("vmm", f"{CALL_RUN_POD}/vm.restore", pss=77 * MIB, rss=90 * MIB,
                              uss=60 * MIB, threads=4, boot="restore"))
    return ChainModel(chain=chain, flavor=flavor, calls=calls, memory=tuple(mem)), alternatives
