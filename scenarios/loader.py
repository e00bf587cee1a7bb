"""Owns: the scenario file format (TOML), its validation and its digest.

A scenario describes a CRI load that bench runs for real and sim models: how many pods, at what
concurrency, with how many containers, for which chains and flavor.  Model-only settings live in
the `[sim]` table, which bench ignores and sim interprets (sim.scenario_model).
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.vocabulary import CHAINS, FLAVORS

SCENARIO_DIR = Path(__file__).resolve().parent
DEFAULT_SCENARIO = SCENARIO_DIR / "runc-seq.toml"


class ScenarioError(ValueError):
    """A scenario file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ContainerSpec:
    command: tuple[str, ...] = ("/bin/sleep", "3600")
    image: str = "busybox"


@dataclass(frozen=True)
class Scenario:
    name: str
    flavor: str = "runc"
    chains: tuple[str, ...] = ("shim", "sandbox")
    pods: int = 20
    concurrency: int = 1
    containers_per_pod: int = 1
    warmup_pods: int = 2
    # Live-pod counts at which memory is sampled while pods accumulate (0 = before any pod).
    memory_at: tuple[int, ...] = ()
    # Seconds each pod stays up after its containers start (0 = until the whole ramp is done).
    lifetime_s: float = 0.0
    boot: str = "restore"  # microvm flavor: restore | cold
    # microvm flavor, sandbox chain: VMs the sandboxer keeps ready ahead of Start (0 = none).
    # "spawned": QEMU started and waiting for the snapshot (the restore stays on the pod's
    # path); "restored": already restored and warm (Kata's VM cache: Start is one round trip).
    vm_pool: int = 0
    vm_pool_mode: str = "spawned"
    schema: str = "current"  # Sandbox API schema the sandbox chain uses: legacy | current
    container: ContainerSpec = field(default_factory=ContainerSpec)
    description: str = ""
    sim: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    digest: str = ""

    def memory_points(self) -> tuple[int, ...]:
        """Sampling points: the file's list, else 0, quartiles and the full pod count."""
        if self.memory_at:
            return self.memory_at
        n = self.pods
        return tuple(sorted({0, n // 4, n // 2, (3 * n) // 4, n}))


_KNOWN = {"name", "flavor", "chains", "pods", "concurrency", "containers_per_pod", "warmup_pods",
          "memory_at", "lifetime_s", "boot", "vm_pool", "vm_pool_mode", "schema", "container", "description", "sim"}


def parse_scenario(text: str, path: str = "<string>") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: invalid TOML: {exc}") from exc
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise ScenarioError(f"{path}: unknown keys {unknown}; known: {sorted(_KNOWN)}")
    if "name" not in data:
        raise ScenarioError(f"{path}: 'name' is required")

    def _int(key: str, default: int, lo: int) -> int:
        v = data.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ScenarioError(f"{path}: {key} must be an integer >= {lo}, got {v!r}")
        return v

    chains = tuple(data.get("chains", ("shim", "sandbox")))
    bad = [c for c in chains if c not in CHAINS]
    if bad or not chains:
        raise ScenarioError(f"{path}: chains {bad or chains} not in {list(CHAINS)}")
    flavor = data.get("flavor", "runc")
    if flavor not in FLAVORS:
        raise ScenarioError(f"{path}: flavor {flavor!r} not in {list(FLAVORS)}")
    boot = data.get("boot", "restore")
    if boot not in ("restore", "cold"):
        raise ScenarioError(f"{path}: boot must be 'restore' or 'cold', got {boot!r}")
    vm_pool_mode = data.get("vm_pool_mode", "spawned")
    if vm_pool_mode not in ("spawned", "restored"):
        raise ScenarioError(f"{path}: vm_pool_mode must be 'spawned' or 'restored', "
                            f"got {vm_pool_mode!r}")
    schema = data.get("schema", "current")
    if schema not in ("legacy", "current"):
        raise ScenarioError(f"{path}: schema must be 'legacy' or 'current', got {schema!r}")
    pods = _int("pods", 20, 1)
    memory_at = tuple(data.get("memory_at", ()))
    if any((not isinstance(m, int)) or m < 0 or m > pods for m in memory_at):
        raise ScenarioError(f"{path}: memory_at entries must be integers in [0, pods]")
    c = data.get("container", {})
    if not isinstance(c, dict):
        raise ScenarioError(f"{path}: [container] must be a table")
    command = tuple(c.get("command", ContainerSpec.command))
    if not command or not all(isinstance(a, str) for a in command):
        raise ScenarioError(f"{path}: container.command must be a non-empty list of strings")
    sim = data.get("sim", {})
    if not isinstance(sim, dict):
        raise ScenarioError(f"{path}: [sim] must be a table")
    lifetime = data.get("lifetime_s", 0.0)
    if not isinstance(lifetime, (int, float)) or lifetime < 0:
        raise ScenarioError(f"{path}: lifetime_s must be a number >= 0")
    return Scenario(
        name=str(data["name"]),
        flavor=flavor,
        chains=chains,
        pods=pods,
        concurrency=_int("concurrency", 1, 1),
        containers_per_pod=_int("containers_per_pod", 1, 0),
        warmup_pods=_int("warmup_pods", 2, 0),
        memory_at=tuple(sorted(set(memory_at))),
        lifetime_s=float(lifetime),
        boot=boot,
        vm_pool=_int("vm_pool", 0, 0),
        vm_pool_mode=vm_pool_mode,
        schema=schema,
        container=ContainerSpec(command=command, image=str(c.get("image", "busybox"))),
        description=str(data.get("description", "")),
        sim=sim,
        path=path,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Load a scenario by path, or by bare name from scenarios/ (`runc-seq`)."""
    p = Path(path) if path else DEFAULT_SCENARIO
    if not p.exists() and not p.suffix:
        p = SCENARIO_DIR / f"{p.name}.toml"
    if not p.is_file():
        known = sorted(q.stem for q in SCENARIO_DIR.glob("*.toml"))
        raise ScenarioError(f"scenario {str(path)!r} not found; shipped scenarios: {known}")
    return parse_scenario(p.read_text(encoding="utf-8"), str(p))
