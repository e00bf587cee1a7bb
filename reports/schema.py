"""Owns: the run-directory result schema (run.json + Parquet tables) and its writer and loader.

One schema end to end (DESIGN §4): bench and sim both write it, reports, notebooks and the gate
read it.  Units in storage are seconds and bytes; ms/MB appear only when displaying.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

SCHEMA_VERSION = 1

# Column name -> pandas dtype.  Extra columns are allowed; these are required.
POD_COLUMNS: dict[str, str] = {
    "pod": "string",
    "submit_s": "float64",  # seconds since the run's t0
    "ready_s": "float64",  # RunPodSandbox returned
    "latency_s": "float64",  # RunPodSandbox latency as seen by the client
    "create_start_s": "float64",  # CreateContainer + StartContainer of the pod's containers
    "stop_remove_s": "float64",  # Stop/Remove of containers and pod
    "outcome": "string",  # "ok" | "error"
    "error": "string",
    "warmup": "bool",
}
SPAN_COLUMNS: dict[str, str] = {
    "pod": "string",
    "call": "string",  # CRI call the step belongs to (sim.vocabulary.CALLS)
    "step": "string",  # sim.vocabulary.STEPS
    "component": "string",
    "start_ns": "int64",  # CLOCK_MONOTONIC ns (comparable across processes on one host)
    "end_ns": "int64",
}
MEMORY_COLUMNS: dict[str, str] = {
    "t_s": "float64",
    "role": "string",
    "pid": "int64",
    "rss": "int64",
    "pss": "int64",
    "uss": "int64",
    "threads": "int64",
    "pods_alive": "int64",
}
CPU_COLUMNS: dict[str, str] = {
    "role": "string",
    "pid": "int64",
    "cpu_s": "float64",
}
TABLES: dict[str, dict[str, str]] = {
    "pods": POD_COLUMNS,
    "spans": SPAN_COLUMNS,
    "memory": MEMORY_COLUMNS,
    "cpu": CPU_COLUMNS,
}


class SchemaError(ValueError):
    """A run directory or table does not match the schema."""


@dataclass
class HostFacts:
    kernel: str = ""
    cpu: str = ""
    cores: int = 0
    accel: str = ""  # kvm | tcg | "" (not applicable)
    versions: dict[str, str] = field(default_factory=dict)
    commit: str = ""

    @classmethod
    def collect(cls, accel: str = "", versions: dict[str, str] | None = None) -> "HostFacts":
        return cls(
            kernel=platform.release(),
            cpu=_cpu_model(),
            cores=os.cpu_count() or 0,
            accel=accel,
            versions=dict(versions or {}),
            commit=_git_commit(),
        )


@dataclass
class RunMeta:
    scenario: str
    source: str  # bench | sim
    chain: str  # shim | sandbox | containerd
    flavor: str  # runc | microvm
    scenario_digest: str = ""
    pods: int = 0
    concurrency: int = 1
    containers_per_pod: int = 0
    warmup_pods: int = 0
    t0_ns: int = 0
    started_at: str = ""
    host: HostFacts = field(default_factory=HostFacts)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunMeta":
        missing = [k for k in ("scenario", "source", "chain", "flavor") if k not in data]
        if missing:
            raise SchemaError(f"run.json lacks {missing}")
        host = HostFacts(**data.get("host", {}))
        known = {f for f in cls.__dataclass_fields__}  # tolerate keys added by newer writers
        kwargs = {k: v for k, v in data.items() if k in known and k != "host"}
        return cls(host=host, **kwargs)


@dataclass
class Run:
    path: Path
    meta: RunMeta
    pods: pd.DataFrame
    spans: pd.DataFrame
    memory: pd.DataFrame
    cpu: pd.DataFrame


def empty_table(name: str) -> pd.DataFrame:
    cols = TABLES[name]
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in cols.items()})


def conform(name: str, df: pd.DataFrame | Iterable[dict[str, Any]] | None) -> pd.DataFrame:
    """Coerce rows to the table's dtypes; raise SchemaError naming missing columns."""
    if df is None:
        return empty_table(name)
    if not isinstance(df, pd.DataFrame):
        rows = list(df)
        df = pd.DataFrame(rows) if rows else empty_table(name)
    cols = TABLES[name]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SchemaError(f"table {name!r} lacks columns {missing}")
    out = df.copy()
    for c, t in cols.items():
        try:
            out[c] = out[c].astype(t)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"table {name!r} column {c!r} is not {t}: {exc}") from exc
    return out.reset_index(drop=True)


def write_run(
    out_dir: str | os.PathLike[str],
    meta: RunMeta,
    pods: Any = None,
    spans: Any = None,
    memory: Any = None,
    cpu: Any = None,
) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tables = {"pods": pods, "spans": spans, "memory": memory, "cpu": cpu}
    for name, rows in tables.items():
        conform(name, rows).to_parquet(path / f"{name}.parquet", index=False)
    # run.json last: its presence marks a complete run directory.
    tmp = path / "run.json.tmp"
    tmp.write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path / "run.json")
    return path


def load_run(path: str | os.PathLike[str]) -> Run:
    p = Path(path)
    meta_file = p / "run.json"
    if not meta_file.is_file():
        raise SchemaError(f"{p} is not a run directory (no run.json)")
    try:
        meta = RunMeta.from_json(json.loads(meta_file.read_text()))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{meta_file}: invalid JSON: {exc}") from exc
    tables: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        f = p / f"{name}.parquet"
        tables[name] = conform(name, pd.read_parquet(f)) if f.exists() else empty_table(name)
    return Run(path=p, meta=meta, **tables)


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories at or below each path (a bench run holds one sub-directory per chain)."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise SchemaError(f"{p}: no such directory")
        if (p / "run.json").is_file():
            found.append(p)
            continue
        subs = sorted(q.parent for q in p.rglob("run.json"))
        if not subs:
            raise SchemaError(f"{p}: no run.json at or below it")
        found.extend(subs)
    return found


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Run]:
    return [load_run(p) for p in find_runs(paths)]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""
