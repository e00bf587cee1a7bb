"""Owns: the model-only settings of a scenario — its `[sim]` table, validated and typed.

`[sim]` keys (all optional):
  nodes = 1                       # cluster size; `pods` is per node
  arrival = "burst"               # burst (closed loop, `concurrency` per node) | poisson | trace
  rate = 50.0                     # poisson: pods/s arriving at the whole cluster
  trace = "arrivals.csv"          # trace: csv/parquet with a submit_s column (optional node)
  placement = "round_robin"       # round_robin | random (poisson/trace)
  seed = 1
  calibration = ""                # file (relative to the scenario) or "" = the shipped one
  cores / engine_workers / sandboxer_workers / vmm_boots = N   # what-if capacities
  shim_pss_mb / shim_rss_mb / vmm_pss_mb = X                   # what-if memory per process
  vm_boot_ms / vm_restore_ms = X                               # what-if VM boot time (median)
  stop = true                     # also model Stop/Remove after the ramp
  block = N                       # pods per barrier block, as bench's load driver runs them;
                                  # default: bench's rule (max(concurrency, 5), cut at memory
                                  # points) on one node with burst arrival, else 0 (no blocks)
  aggregate = "auto"              # rows | sketch | auto (sketch above 20,000 pods)
  engine = "fast"                 # fast | naive (reference SimPy model; small runs only)
  core_sharing = "ps"             # ps (processor sharing, as the kernel shares cores) | fifo;
                                  # default: the calibration's
  core_limit = 0                  # ps: at most N jobs share the cores, later ones wait in
                                  # arrival order (limited processor sharing); 0: no limit
  [sim.step_ms]                   # what-if median latency of any step, by name
  "task.create" = 10.0
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sim.chains import LIMITS
from sim.vocabulary import STEPS


class SettingsError(ValueError):
    """The [sim] table of a scenario is malformed."""


@dataclass(frozen=True)
class SimSettings:
    nodes: int = 1
    arrival: str = "burst"
    rate: float = 0.0
    trace: str = ""
    placement: str = "round_robin"
    seed: int = 1
    calibration: str = ""
    cores: int | None = None
    engine_workers: int | None = None
    sandboxer_workers: int | None = None
    vmm_boots: int | None = None
    shim_pss_mb: float | None = None
    shim_rss_mb: float | None = None
    vmm_pss_mb: float | None = None
    vm_boot_ms: float | None = None
    vm_restore_ms: float | None = None
    stop: bool = True
    block: int | None = None
    aggregate: str = "auto"
    engine: str = "fast"
    core_sharing: str | None = None
    core_limit: int = 0
    step_ms: dict[str, float] = field(default_factory=dict)

    def capacities(self, base: dict[str, int]) -> dict[str, int]:
        out = dict(base)
        for lim in LIMITS:
            v = getattr(self, lim)
            if v is not None:
                out[lim] = int(v)
        return out

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_CHOICES = {"arrival": ("burst", "poisson", "trace"), "placement": ("round_robin", "random"),
            "aggregate": ("auto", "rows", "sketch"), "engine": ("fast", "naive"),
            "core_sharing": ("ps", "fifo")}


def parse_settings(table: dict[str, Any], scenario_path: str = "") -> SimSettings:
    """Validate a scenario's [sim] table; relative file names resolve against the scenario."""
    known = {f.name for f in fields(SimSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise SettingsError(f"[sim]: unknown keys {unknown}; known: {sorted(known)}")
    kw: dict[str, Any] = {}
    for key, val in table.items():
        if key in _CHOICES:
            if val not in _CHOICES[key]:
                raise SettingsError(f"[sim] {key} must be one of {list(_CHOICES[key])}, "
                                    f"got {val!r}")
            kw[key] = val
        elif key in ("block", "core_limit"):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise SettingsError(f"[sim] {key} must be an integer >= 0, got {val!r}")
            kw[key] = val
        elif key in ("nodes", "seed") or key in LIMITS:
            if not isinstance(val, int) or isinstance(val, bool) or val < (0 if key == "seed"
                                                                           else 1):
                raise SettingsError(f"[sim] {key} must be a positive integer, got {val!r}")
            kw[key] = val
        elif key in ("rate", "shim_pss_mb", "shim_rss_mb", "vmm_pss_mb", "vm_boot_ms",
                     "vm_restore_ms"):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or val <= 0:
                raise SettingsError(f"[sim] {key} must be a number > 0, got {val!r}")
            kw[key] = float(val)
        elif key == "stop":
            if not isinstance(val, bool):
                raise SettingsError(f"[sim] stop must be true or false, got {val!r}")
            kw[key] = val
        elif key in ("trace", "calibration"):
            if not isinstance(val, str):
                raise SettingsError(f"[sim] {key} must be a file name, got {val!r}")
            if val and scenario_path and not Path(val).is_absolute():
                cand = Path(scenario_path).resolve().parent / val
                val = str(cand) if cand.exists() else val
            kw[key] = val
        elif key == "step_ms":
            if not isinstance(val, dict):
                raise SettingsError("[sim.step_ms] must be a table of step = milliseconds")
            bad = sorted(k for k in val if k not in STEPS)
            if bad:
                raise SettingsError(f"[sim.step_ms]: unknown steps {bad}")
            for k, v in val.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                    raise SettingsError(f"[sim.step_ms] {k} must be a number > 0")
            kw[key] = {k: float(v) for k, v in val.items()}
    s = SimSettings(**kw)
    if s.arrival == "poisson" and s.rate <= 0:
        raise SettingsError("[sim] arrival = 'poisson' needs rate > 0 (pods/s, whole cluster)")
    if s.arrival == "trace" and not s.trace:
        raise SettingsError("[sim] arrival = 'trace' needs trace = FILE")
    return s


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` from the command line (`--set cores=8`); the value is parsed as TOML."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"--set wants key=value, got {text!r}")
    try:
        val = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        val = raw.strip()
    return key.strip(), val
