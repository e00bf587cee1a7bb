"""Owns: the chains as data — ordered steps per call with cost distributions, limits and memory.

A chain (shim | sandbox, per flavor) is a list of `Step`s per CRI call, in execution order,
using the step names of sim.vocabulary so a simulated trace lines up with a bench trace.  Each
step carries its latency distribution, the fraction of it that is CPU work, the limit it queues
on (or none) and how much of its latency it holds that limit.  A step may hold two limits: a
worker pool for its whole duration (one engine or sandboxer request handler, a VMM boot slot)
and, inside it, the node's cores for its CPU part (`cores`) — a handler that waits for a core
keeps its worker, which is how one busy process stalls every request queued behind it.
The numbers come
from a calibration file (sim.calibration); this module only knows the *shape* of each chain
(which steps, in which component, queueing where) and turns a calibration into a `Program` —
the flat, pod-lifecycle ordered step list the node models execute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sim.vocabulary import (
    CALL_CREATE_CONTAINER,
    CALL_REMOVE_CONTAINER,
    CALL_REMOVE_POD,
    CALL_RUN_POD,
    CALL_START_CONTAINER,
    CALL_STOP_CONTAINER,
    CALL_STOP_POD,
    CALLS,
    COMPONENTS,
    ROLES,
    RUN_POD_STEPS,
    check_step,
)

# Concurrency limits a step may queue on.  Capacities come from the calibration's node facts
# and the scenario's [sim] overrides.
LIMITS: tuple[str, ...] = ("cores", "engine_workers", "sandboxer_workers", "vmm_boots")

# Calls repeated once per container of a pod.
PER_CONTAINER_CALLS: frozenset[str] = frozenset(
    {CALL_CREATE_CONTAINER, CALL_START_CONTAINER, CALL_STOP_CONTAINER, CALL_REMOVE_CONTAINER})


class ChainError(ValueError):
    """A chain definition or calibration entry is inconsistent."""


@dataclass(frozen=True)
class Dist:
    """A step-latency distribution in seconds: const, lognormal(median, sigma) or empirical."""

    kind: str = "const"
    value_s: float = 0.0  # const
    median_s: float = 0.0  # lognormal: exp(mu)
    sigma: float = 0.0  # lognormal: sd of log
    quantiles_s: tuple[float, ...] = ()  # empirical: values at equally spaced probabilities

    def __post_init__(self) -> None:
        if self.kind == "const":
            if not (self.value_s >= 0 and math.isfinite(self.value_s)):
                raise ChainError(f"const latency must be >= 0, got {self.value_s}")
        elif self.kind == "lognormal":
            if not (self.median_s > 0 and self.sigma >= 0):
                raise ChainError(f"lognormal needs median_s > 0 and sigma >= 0, got {self}")
        elif self.kind == "empirical":
            q = self.quantiles_s
            if len(q) < 2 or any(b < a for a, b in zip(q, q[1:])) or q[0] < 0:
                raise ChainError("empirical quantiles_s must be >= 2 non-decreasing values >= 0")
        else:
            raise ChainError(f"unknown distribution kind {self.kind!r}")

    def sample(self, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Seconds from standard-normal `z` and uniform `u` draws (same shape)."""
        if self.kind == "const":
            return np.full(z.shape, self.value_s)
        if self.kind == "lognormal":
            return np.exp(math.log(self.median_s) + self.sigma * z)
        q = np.asarray(self.quantiles_s)
        return np.interp(u * (len(q) - 1), np.arange(len(q)), q)

    def median(self) -> float:
        if self.kind == "const":
            return self.value_s
        if self.kind == "lognormal":
            return self.median_s
        return float(np.interp(0.5 * (len(self.quantiles_s) - 1),
                               np.arange(len(self.quantiles_s)), self.quantiles_s))

    def scaled_to_median(self, median_s: float) -> "Dist":
        """The same shape moved to a new median (what-if overrides)."""
        if median_s <= 0:
            raise ChainError(f"median must be > 0, got {median_s}")
        if self.kind == "const":
            return replace(self, value_s=median_s)
        if self.kind == "lognormal":
            return replace(self, median_s=median_s)
        f = median_s / max(self.median(), 1e-12)
        return replace(self, quantiles_s=tuple(v * f for v in self.quantiles_s))

    def to_json(self) -> dict[str, Any]:
        if self.kind == "const":
            return {"kind": "const", "value_s": self.value_s}
        if self.kind == "lognormal":
            return {"kind": "lognormal", "median_s": self.median_s, "sigma": self.sigma}
        return {"kind": "empirical", "quantiles_s": list(self.quantiles_s)}

    @classmethod
    def from_json(cls, d: Any) -> "Dist":
        if not isinstance(d, dict) or "kind" not in d:
            raise ChainError(f"distribution must be a table with 'kind', got {d!r}")
        try:
            if d["kind"] == "const":
                return cls("const", value_s=float(d["value_s"]))
            if d["kind"] == "lognormal":
                return cls("lognormal", median_s=float(d["median_s"]), sigma=float(d["sigma"]))
            if d["kind"] == "empirical":
                return cls("empirical", quantiles_s=tuple(float(v) for v in d["quantiles_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ChainError(f"bad distribution {d!r}: {exc}") from exc
        raise ChainError(f"unknown distribution kind {d['kind']!r}")


@dataclass(frozen=True)
class Step:
    """One step of one call: where it runs, what it costs, what it queues on."""

    call: str
    step: str
    component: str
    dist: Dist
    cpu: float = 0.0  # fraction of the latency that is CPU work (cpu table, per role)
    limit: str | None = None  # the concurrency limit it queues on first
    hold: float = 1.0  # fraction of the latency the limit is held (the rest is waiting)
    # With a pool as `limit`: the fraction of the latency spent on the node's cores, queued for
    # once the pool is granted and held inside the pool's hold (0: the pool only).
    cores: float = 0.0
    # The free part (1 - hold) comes before the step asks for its limit, not after it: a CRI
    # call travels from the client before the engine's loop takes it.
    wait_first: bool = False
    # CPU seconds per pod of a process that starts running at this step's end and that no
    # step owns (the shim chain's pause process): a job on the node's cores, off the pod's
    # path — the pod goes on, but every step on the cores shares them with it.
    offpath: float = 0.0

    def __post_init__(self) -> None:
        check_step(self.step)
        if self.call not in CALLS:
            raise ChainError(f"unknown call {self.call!r}")
        if self.component not in COMPONENTS:
            raise ChainError(f"unknown component {self.component!r}")
        if self.limit is not None and self.limit not in LIMITS:
            raise ChainError(f"step {self.call}/{self.step}: unknown limit {self.limit!r}; "
                             f"known: {list(LIMITS)}")
        if not (0.0 <= self.cpu <= 1.0 and 0.0 <= self.hold <= 1.0):
            raise ChainError(f"step {self.call}/{self.step}: cpu and hold must be in [0, 1]")
        if not 0.0 <= self.cores <= self.hold:
            raise ChainError(f"step {self.call}/{self.step}: cores must be in [0, hold] "
                             f"(the core part runs while the pool is held), got {self.cores}")
        if not (self.offpath >= 0 and math.isfinite(self.offpath)):
            raise ChainError(f"step {self.call}/{self.step}: offpath must be >= 0 s, "
                             f"got {self.offpath}")
        if self.cores > 0 and self.limit in (None, "cores"):
            raise ChainError(f"step {self.call}/{self.step}: cores > 0 needs a pool as limit; "
                             f"a step on the cores alone is limit 'cores' with its hold")

    @property
    def key(self) -> str:
        return f"{self.call}/{self.step}"

    def to_json(self) -> dict[str, Any]:
        out = {"step": self.step, "component": self.component, "dist": self.dist.to_json(),
               "cpu": self.cpu, "limit": self.limit, "hold": self.hold}
        if self.cores:
            out["cores"] = self.cores
        if self.wait_first:
            out["wait_first"] = True
        if self.offpath:
            out["offpath"] = self.offpath
        return out

    @classmethod
    def from_json(cls, call: str, s: dict[str, Any]) -> "Step":
        return cls(call=call, step=s["step"], component=s["component"],
                   dist=Dist.from_json(s["dist"]), cpu=float(s.get("cpu", 0)),
                   limit=s.get("limit"), hold=float(s.get("hold", 1.0)),
                   cores=float(s.get("cores", 0.0)),
                   wait_first=bool(s.get("wait_first", False)),
                   offpath=float(s.get("offpath", 0.0)))


@dataclass(frozen=True)
class MemoryItem:
    """Memory a pod adds for its lifetime: one process of `role` (or growth of a shared one)."""

    role: str
    after: str  # "Call/step": the process exists from the end of this step
    pss: int = 0
    rss: int = 0
    uss: int = 0
    threads: int = 0
    boot: str | None = None  # microvm: only for this boot mode (cold | restore)
    shared: bool = False  # growth of one long-lived process (sandboxer), not a new process

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "after": self.after, "pss": self.pss, "rss": self.rss,
                "uss": self.uss, "threads": self.threads, "boot": self.boot,
                "shared": self.shared}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "MemoryItem":
        if d.get("role") not in ROLES:
            raise ChainError(f"memory item role {d.get('role')!r} not in {list(ROLES)}")
        return cls(role=d["role"], after=str(d.get("after", f"{CALL_RUN_POD}/cri.reply")),
                   pss=int(d.get("pss", 0)), rss=int(d.get("rss", 0)),
                   uss=int(d.get("uss", 0)), threads=int(d.get("threads", 0)),
                   boot=d.get("boot"), shared=bool(d.get("shared", False)))


@dataclass(frozen=True)
class ChainModel:
    """One chain+flavor: the ordered steps of every call and the memory a pod adds."""

    chain: str
    flavor: str
    calls: dict[str, tuple[Step, ...]]
    memory: tuple[MemoryItem, ...] = ()
    # Steps that replace a same-call step of another name (vm.restore for vm.boot).
    alternatives: dict[str, Step] = field(default_factory=dict)
    provenance: str = ""

    def steps(self, call: str) -> tuple[Step, ...]:
        return self.calls.get(call, ())

    def with_boot(self, boot: str) -> "ChainModel":
        """microVM: swap vm.boot and vm.restore per the scenario's boot mode."""
        want, other = ("vm.restore", "vm.boot") if boot == "restore" else ("vm.boot", "vm.restore")
        alt = self.alternatives.get(want)
        calls = dict(self.calls)
        if alt is not None:
            for call, steps in self.calls.items():
                if any(s.step == other for s in steps):
                    calls[call] = tuple(alt if s.step == other else s for s in steps)
        mem = tuple(m for m in self.memory if m.boot in (None, boot))
        return replace(self, calls=calls, memory=mem)

    def with_step_median(self, step: str, median_s: float) -> "ChainModel":
        calls = {c: tuple(replace(s, dist=s.dist.scaled_to_median(median_s))
                          if s.step == step else s for s in steps)
                 for c, steps in self.calls.items()}
        alts = {k: replace(s, dist=s.dist.scaled_to_median(median_s)) if k == step else s
                for k, s in self.alternatives.items()}
        return replace(self, calls=calls, alternatives=alts)

    def with_memory(self, role: str, pss: int | None = None, rss: int | None = None) -> "ChainModel":
        mem = tuple(replace(m, pss=m.pss if pss is None else pss, rss=m.rss if rss is None else rss)
                    if m.role == role else m for m in self.memory)
        return replace(self, memory=mem)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "calls": {c: [s.to_json() for s in steps] for c, steps in self.calls.items()},
            "memory": [m.to_json() for m in self.memory]}
        if self.alternatives:
            out["alternatives"] = {k: dict(s.to_json(), call=s.call)
                                   for k, s in self.alternatives.items()}
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    @classmethod
    def from_json(cls, key: str, d: dict[str, Any]) -> "ChainModel":
        chain, _, flavor = key.partition("/")
        calls: dict[str, tuple[Step, ...]] = {}
        for call, steps in dict(d.get("calls", {})).items():
            out = []
            for s in steps:
                try:
                    out.append(Step.from_json(call, s))
                except (KeyError, TypeError, ValueError) as exc:
                    raise ChainError(f"chain {key} call {call}: bad step {s!r}: {exc}") from exc
            calls[call] = tuple(out)
        if CALL_RUN_POD not in calls:
            raise ChainError(f"chain {key}: no {CALL_RUN_POD} steps")
        mem = tuple(MemoryItem.from_json(m) for m in d.get("memory", []))
        alts: dict[str, Step] = {}
        for name, s in dict(d.get("alternatives", {})).items():
            try:
                alts[name] = Step.from_json(s.get("call", CALL_RUN_POD), s)
            except (KeyError, TypeError, ValueError) as exc:
                raise ChainError(f"chain {key}: bad alternative {name}: {exc}") from exc
        return cls(chain=chain, flavor=flavor, calls=calls, memory=mem, alternatives=alts,
                   provenance=str(d.get("provenance", "")))


# ---------------------------------------------------------------------------------------------
# The shape of each chain: (step, component, limit, hold-is-cpu) per call.  Used to build the
# prior calibration and as defaults for limits when fitting from bench spans.
# hold "cpu" means the limit (cores) is held for the CPU part only; 1.0 for worker pools, which
# serialise the whole step (an asyncio loop doing blocking work, a boot slot).

def _shape_calls(chain: str, flavor: str) -> dict[str, list[tuple[str, str]]]:
    """(step, component) per call, in order."""
    task_comp = "shim" if chain == "shim" else ("agent" if flavor == "microvm" else "sandboxer")
    if flavor == "microvm" and chain == "shim":
        task_comp = "agent"
    run_pod = [(r.step, r.component) for r in RUN_POD_STEPS[(chain, flavor)]]
    create = [("cri.recv", "engine"), ("engine.prepare", "engine")]
    if chain == "sandbox":
        create.append(("sandbox.update", "sandboxer"))
    create += [("task.create", task_comp), ("engine.commit", "engine"), ("cri.reply", "engine")]
    start = [("cri.recv", "engine"), ("task.start", task_comp), ("engine.commit", "engine"),
             ("cri.reply", "engine")]
    stop_c = [("cri.recv", "engine"), ("task.kill", task_comp), ("task.wait", task_comp),
              ("engine.commit", "engine"), ("cri.reply", "engine")]
    remove_c = [("cri.recv", "engine"), ("task.delete", task_comp)]
    if chain == "sandbox":
        remove_c.append(("sandbox.update", "sandboxer"))
    remove_c += [("engine.commit", "engine"), ("cri.reply", "engine")]
    if chain == "shim":
        stop_p = [("cri.recv", "engine"), ("task.kill", "shim"), ("task.wait", "shim"),
                  ("task.delete", "shim"), ("shim.shutdown", "engine"),
                  ("engine.commit", "engine"), ("cri.reply", "engine")]
        remove_p = [("cri.recv", "engine"), ("shim.delete", "engine"),
                    ("engine.commit", "engine"), ("cri.reply", "engine")]
    else:
        stop_p = [("cri.recv", "engine"), ("sandbox.stop", "sandboxer"),
                  ("sandbox.wait", "sandboxer"), ("engine.commit", "engine"),
                  ("cri.reply", "engine")]
        remove_p = [("cri.recv", "engine"), ("sandbox.shutdown", "sandboxer"),
                    ("engine.commit", "engine"), ("cri.reply", "engine")]
    return {CALL_RUN_POD: run_pod, CALL_CREATE_CONTAINER: create, CALL_START_CONTAINER: start,
            CALL_STOP_CONTAINER: stop_c, CALL_REMOVE_CONTAINER: remove_c,
            CALL_STOP_POD: stop_p, CALL_REMOVE_POD: remove_p}


# Which limit a step queues on, by (step, component).  Engine bookkeeping serialises on the
# engine's workers; fork/exec-heavy work (a shim's `start`: its fork until the exec, shim.launch,
# done in a worker thread as containerd does it in a goroutine, then the rest, shim.spawn; runc)
# competes for cores; every Sandbox API call (gRPC Controller) on the sandboxer's request
# workers — bench shows them served one at a time, in arrival order, however many pods wait;
# VM boots on boot slots.
_LIMIT_BY_STEP: dict[tuple[str, str], str] = {
    ("engine.prepare", "engine"): "engine_workers",
    ("engine.commit", "engine"): "engine_workers",
    ("shim.launch", "engine"): "cores",
    ("shim.spawn", "engine"): "cores",
    ("shim.delete", "engine"): "cores",
    ("task.create", "shim"): "cores",
    ("task.start", "shim"): "cores",
    ("task.delete", "shim"): "cores",
    ("task.create", "sandboxer"): "cores",
    ("task.start", "sandboxer"): "cores",
    ("task.delete", "sandboxer"): "cores",
    ("sandbox.create", "sandboxer"): "sandboxer_workers",
    ("sandbox.start", "sandboxer"): "sandboxer_workers",
    ("sandbox.update", "sandboxer"): "sandboxer_workers",
    ("sandbox.stop", "sandboxer"): "sandboxer_workers",
    ("sandbox.shutdown", "sandboxer"): "sandboxer_workers",
    ("vm.boot", "vmm"): "vmm_boots",
    ("vm.restore", "vmm"): "vmm_boots",
}


def default_limit(step: str, component: str) -> tuple[str | None, bool]:
    """(limit, hold_is_cpu) for a step by name and component."""
    lim = _LIMIT_BY_STEP.get((step, component))
    return lim, lim == "cores"


def shape(chain: str, flavor: str) -> dict[str, list[tuple[str, str, str | None, bool]]]:
    """Per call: (step, component, limit, hold_is_cpu) — the data-only shape of a chain."""
    if (chain, flavor) not in RUN_POD_STEPS:
        raise ChainError(f"no chain shape for {chain}/{flavor}")
    return {call: [(s, c, *default_limit(s, c)) for s, c in steps]
            for call, steps in _shape_calls(chain, flavor).items()}


# ---------------------------------------------------------------------------------------------
# Programs: the flat step list one pod executes in a phase, with capacities applied.

@dataclass(frozen=True)
class Program:
    """The steps a pod runs in one phase (start: RunPod + containers; stop: the teardown)."""

    steps: tuple[Step, ...]
    # per step: index into `limits` of the limit it queues on, or -1 (free / uncontended)
    limit_index: tuple[int, ...]
    limits: tuple[str, ...]
    capacities: tuple[int, ...]
    # Per step: the fraction of the latency the limit is held (0 for free steps).
    hold: tuple[float, ...] = field(default=())
    # Per step: which call instance it belongs to (a pod's second CreateContainer is another).
    instance: tuple[int, ...] = field(default=())
    # Per step: the fraction of the latency it runs on the cores while holding its pool (0:
    # one limit only); nonzero only when both the pool and the cores are contended.
    core_hold: tuple[float, ...] = field(default=())
    # How the cores serve their steps: "fifo" (one step per core, in arrival order) or "ps"
    # (processor sharing, as the kernel's fair scheduler does: sim.cores).
    sharing: str = "fifo"
    # Per step: its free part comes before its limit (Step.wait_first).
    wait_first: tuple[bool, ...] = field(default=())
    # Per step: ns of CPU started on the cores at its end, off the pod's path (Step.offpath).
    offpath: tuple[int, ...] = field(default=())
    # With "ps": at most this many jobs share the cores, the rest wait in arrival order
    # (limited processor sharing, sim.cores.PSCores); 0: no limit.
    ps_limit: int = 0

    @property
    def stages(self) -> tuple[tuple[int, bool], ...]:
        """The pod's events in order: (step, False) asks for the step's limit, (step, True)
        starts its off-path job at its end (after the step's own stage, if it has one)."""
        out: list[tuple[int, bool]] = []
        for k, r in enumerate(self.limit_index):
            if r >= 0:
                out.append((k, False))
            if self.offpath and self.offpath[k] > 0:
                out.append((k, True))
        return tuple(out)

    @property
    def free_first(self) -> tuple[bool, ...]:
        """Per step: Step.wait_first (all False for a Program built without it)."""
        return self.wait_first or (False,) * len(self.steps)

    @property
    def limited(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.limit_index) if r >= 0)

    @property
    def core_index(self) -> int:
        """Index of `cores` in `limits`, or -1 when the cores are not contended."""
        return self.limits.index("cores") if "cores" in self.limits else -1

    @property
    def shares_cores(self) -> bool:
        """The cores are contended and served by processor sharing (sim.cores)."""
        return self.sharing == "ps" and self.core_index >= 0

    @property
    def two_limit(self) -> bool:
        return any(h > 0 for h in self.core_hold)

    @property
    def queued_pools(self) -> frozenset[int]:
        """Limits (indices) held by a two-limit step: a holder's release time is not known
        when it is granted (it still has to wait for a core), so they run as real queues."""
        return frozenset(r for r, h in zip(self.limit_index, self.core_hold) if h > 0)

    def call_bounds(self, call: str) -> tuple[int, int] | None:
        """First and last step index of `call` (over all its repetitions)."""
        idx = [i for i, s in enumerate(self.steps) if s.call == call]
        return (idx[0], idx[-1]) if idx else None


def start_sequence(containers: int) -> list[str]:
    """The calls that bring one pod up, in bench's order: the pod, then each container."""
    return [CALL_RUN_POD] + [CALL_CREATE_CONTAINER, CALL_START_CONTAINER] * containers


def stop_sequence(containers: int) -> list[str]:
    return [CALL_STOP_CONTAINER, CALL_REMOVE_CONTAINER] * containers + [CALL_STOP_POD,
                                                                          CALL_REMOVE_POD]


def build_program(model: ChainModel, calls: list[str], capacities: dict[str, int],
                  max_in_flight: int, prune: bool = True, sharing: str = "fifo",
                  ps_limit: int = 0) -> Program:
    """Concatenate the steps of `calls` (one entry per call instance) and bind limits.

    A limit whose capacity is at least the pods that can be in flight on a node can never make
    a step wait, so its steps are marked free: the result is identical and the fast model does
    less work.  `prune=False` keeps every limit (the reference model does, to prove it).
    """
    steps: list[Step] = []
    instance: list[int] = []
    for n, call in enumerate(calls):
        got = model.steps(call)
        steps.extend(got)
        instance.extend([n] * len(got))
    used_set = {s.limit for s in steps if s.limit is not None}
    off = any(s.offpath > 0 for s in steps)
    if off or any(s.cores > 0 for s in steps):
        used_set.add("cores")
    used = sorted(used_set, key=LIMITS.index)
    if ps_limit < 0:
        raise ChainError(f"ps_limit must be >= 0 (0: no limit), got {ps_limit}")
    for lim in used:
        if capacities.get(lim, 0) < 1:
            raise ChainError(f"limit {lim} needs a capacity >= 1, got {capacities.get(lim)}")
    # Off-path jobs come on top of the pods in flight: the cores stay contended with them.
    contended = [lim for lim in used
                 if not prune or capacities[lim] < max_in_flight or (off and lim == "cores")]
    limit_index: list[int] = []
    hold: list[float] = []
    core_hold: list[float] = []
    for s in steps:
        if s.limit in contended:
            limit_index.append(contended.index(s.limit))
            hold.append(s.hold)
            core_hold.append(s.cores if "cores" in contended else 0.0)
        elif s.cores > 0 and "cores" in contended:
            # The pool never makes it wait: only its time on the cores is contended.
            limit_index.append(contended.index("cores"))
            hold.append(s.cores)
            core_hold.append(0.0)
        else:
            limit_index.append(-1)
            hold.append(0.0)
            core_hold.append(0.0)
    return Program(steps=tuple(steps), limit_index=tuple(limit_index), limits=tuple(contended),
                   capacities=tuple(capacities[lim] for lim in contended), hold=tuple(hold),
                   instance=tuple(instance), core_hold=tuple(core_hold), sharing=sharing,
                   wait_first=tuple(s.wait_first and r >= 0
                                    for s, r in zip(steps, limit_index)),
                   offpath=tuple(int(round(s.offpath * 1e9)) for s in steps) if off else (),
                   ps_limit=int(ps_limit) if sharing == "ps" else 0)
