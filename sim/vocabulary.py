"""Owns: the closed vocabulary shared by bench spans and sim steps (steps, calls, chains, roles).

Bench records spans with these names and the simulator models steps with the same names, so a
measured trace and a simulated one can be compared row by row.  Extend the sets here; never
invent a name at a call site.
"""
from __future__ import annotations

from dataclasses import dataclass

# CRI calls the load driver issues; spans carry the call they belong to.
CALL_RUN_POD = "RunPodSandbox"
CALL_CREATE_CONTAINER = "CreateContainer"
CALL_START_CONTAINER = "StartContainer"
CALL_STOP_CONTAINER = "StopContainer"
CALL_REMOVE_CONTAINER = "RemoveContainer"
CALL_STOP_POD = "StopPodSandbox"
CALL_REMOVE_POD = "RemovePodSandbox"

CALLS: tuple[str, ...] = (
    CALL_RUN_POD,
    CALL_CREATE_CONTAINER,
    CALL_START_CONTAINER,
    CALL_STOP_CONTAINER,
    CALL_REMOVE_CONTAINER,
    CALL_STOP_POD,
    CALL_REMOVE_POD,
)

# Every step name a span or a simulated step may carry.
STEPS: frozenset[str] = frozenset(
    {
        # engine side
        "cri.recv",
        "engine.prepare",
        "engine.commit",
        "cri.reply",
        # shim chain
        "shim.spawn",
        # the engine forking the shim's `start` until it exec'd (then shim.spawn: `start` runs
        # until it printed the daemon's address)
        "shim.launch",
        "shim.shutdown",
        "shim.delete",
        # task API (both chains)
        "task.connect",
        "task.create",
        "task.start",
        "task.kill",
        "task.wait",
        "task.delete",
        # sandbox API (sandbox chain)
        "sandbox.create",
        "sandbox.start",
        "sandbox.update",
        "sandbox.stop",
        "sandbox.wait",
        "sandbox.shutdown",
        # microVM flavor
        "vm.boot",
        "vm.restore",
        "agent.ready",
        # load driver: a whole CRI call as seen by the client
        "client.call",
    }
)

CHAINS: tuple[str, ...] = ("shim", "sandbox", "containerd")
FLAVORS: tuple[str, ...] = ("runc", "microvm")
SOURCES: tuple[str, ...] = ("bench", "sim")

# Roles of processes whose memory/CPU is sampled.
ROLES: tuple[str, ...] = (
    "engine",
    "sandboxer",
    "shim",
    "pause",
    "vmm",
    "agent",
    "containerd",
    "container",
    # The load driver (CRI client) itself: its CPU shares the node's cores with the chain.
    "client",
)
# The management plane a chain adds per pod (DESIGN §4): shims, pause processes and the
# sandboxer's growth.  The engine (or containerd daemon) is common to a chain and excluded.
MGMT_ROLES: frozenset[str] = frozenset({"shim", "pause", "sandboxer"})
VMM_ROLES: frozenset[str] = frozenset({"vmm"})

# Component names that own steps (the node/process a step runs in).
COMPONENTS: frozenset[str] = frozenset(
    {"client", "engine", "shim", "runc", "sandboxer", "vmm", "agent", "containerd"}
)


@dataclass(frozen=True)
class StepRef:
    """One step of a chain: its name and the component that executes it."""

    step: str
    component: str

    def __post_init__(self) -> None:
        check_step(self.step)
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}; known: {sorted(COMPONENTS)}")


def check_step(name: str) -> str:
    """Return `name` if it is in the vocabulary, else raise ValueError naming the closest set."""
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; the vocabulary is {sorted(STEPS)}")
    return name


# Canonical RunPodSandbox step order per chain (DESIGN §1); sim models and reports use it
# to order waterfalls.  The microVM flavor inserts vm.boot|vm.restore and agent.ready.
RUN_POD_STEPS: dict[tuple[str, str], tuple[StepRef, ...]] = {
    ("shim", "runc"): (
        StepRef("cri.recv", "engine"),
        StepRef("engine.prepare", "engine"),
        StepRef("shim.launch", "engine"),
        StepRef("shim.spawn", "engine"),
        StepRef("task.connect", "engine"),
        StepRef("task.create", "shim"),
        StepRef("task.start", "shim"),
        StepRef("engine.commit", "engine"),
        StepRef("cri.reply", "engine"),
    ),
    ("sandbox", "runc"): (
        StepRef("cri.recv", "engine"),
        StepRef("engine.prepare", "engine"),
        StepRef("sandbox.create", "sandboxer"),
        StepRef("sandbox.start", "sandboxer"),
        StepRef("task.connect", "engine"),
        StepRef("engine.commit", "engine"),
        StepRef("cri.reply", "engine"),
    ),
    ("shim", "microvm"): (
        StepRef("cri.recv", "engine"),
        StepRef("engine.prepare", "engine"),
        StepRef("shim.launch", "engine"),
        StepRef("shim.spawn", "engine"),
        StepRef("task.connect", "engine"),
        StepRef("vm.boot", "vmm"),
        StepRef("agent.ready", "shim"),
        StepRef("task.create", "shim"),
        StepRef("task.start", "shim"),
        StepRef("engine.commit", "engine"),
        StepRef("cri.reply", "engine"),
    ),
    ("sandbox", "microvm"): (
        StepRef("cri.recv", "engine"),
        StepRef("engine.prepare", "engine"),
        StepRef("sandbox.create", "sandboxer"),
        StepRef("vm.boot", "vmm"),
        StepRef("agent.ready", "sandboxer"),
        StepRef("sandbox.start", "sandboxer"),
        StepRef("task.connect", "engine"),
        StepRef("engine.commit", "engine"),
        StepRef("cri.reply", "engine"),
    ),
}
