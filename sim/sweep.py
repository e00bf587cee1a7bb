"""Owns: parameter sweeps — a grid of simulated scenarios run in parallel, one run dir each.

    chainbench sweep SWEEP.toml --out DIR [--workers N] [--scheduler tcp://HOST:PORT]

Sweep file:
    name = "sweep-cores"
    scenario = "runc-c10"          # base scenario: shipped name or path (relative to the file)
    chains = ["shim", "sandbox"]   # optional subset of the scenario's chains
    seeds = [1, 2]                 # optional; each grid point runs once per seed
    [grid]                         # every combination of these values is one point
    cores = [1, 2, 4]              # [sim] keys (model settings, what-ifs)
    concurrency = [1, 10]          # or scenario keys: pods, concurrency, containers_per_pod,
                                   # warmup_pods, boot
    "step_ms.task.create" = [10.0, 20.0]

Points run in local processes by default, or on a Dask distributed cluster with --scheduler
(workers must see DIR: same machine or a shared filesystem).  Each point writes
DIR/<point>/<chain>/; DIR/sweep.json indexes points, parameters and headline figures and
DIR/sweep.parquet holds the same as one tidy table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from scenarios.loader import ScenarioError, load_scenario
from sim.cli_simulate import INPUT_ERRORS, settings_for, simulate_scenario

SCENARIO_KEYS = {"pods": int, "concurrency": int, "containers_per_pod": int,
                 "warmup_pods": int, "boot": str}


class SweepError(ValueError):
    """A sweep file is malformed."""


@dataclass(frozen=True)
class Point:
    name: str
    scenario: str  # path of the base scenario
    params: dict[str, Any]
    chains: tuple[str, ...] = ()
    out: str = ""


@dataclass
class Sweep:
    name: str
    scenario: str
    grid: dict[str, list[Any]]
    seeds: list[int] = field(default_factory=list)
    chains: tuple[str, ...] = ()

    def points(self, out: str) -> list[Point]:
        keys = sorted(self.grid)
        seeds: list[int | None] = list(self.seeds) or [None]
        pts = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            for seed in seeds:
                params = dict(zip(keys, combo))
                if seed is not None:
                    params["seed"] = seed
                pts.append(Point(name=point_name(params), scenario=self.scenario,
                                 params=params, chains=self.chains,
                                 out=str(Path(out) / point_name(params))))
        return pts


def point_name(params: dict[str, Any]) -> str:
    if not params:
        return "base"
    raw = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", raw)


def load_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file {p} not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{p}: invalid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"name", "scenario", "grid", "seeds", "chains", "description"})
    if unknown:
        raise SweepError(f"{p}: unknown keys {unknown}")
    if "scenario" not in data or not isinstance(data["scenario"], str):
        raise SweepError(f"{p}: 'scenario' (base scenario name or path) is required")
    scen = data["scenario"]
    cand = p.resolve().parent / scen
    if cand.is_file():
        scen = str(cand)
    grid = data.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{p}: [grid] must map keys to non-empty lists of values")
    seeds = data.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SweepError(f"{p}: seeds must be a list of integers >= 0")
    if "seed" in grid and seeds:
        raise SweepError(f"{p}: give seeds either in [grid] or as `seeds`, not both")
    chains = data.get("chains", [])
    if not isinstance(chains, list):
        raise SweepError(f"{p}: chains must be a list")
    return Sweep(name=str(data.get("name", p.stem)), scenario=scen, grid=grid, seeds=seeds,
                 chains=tuple(chains))


def prepare(point: Point) -> tuple[Any, Any]:
    """The point's scenario and settings (validated; raises the input errors)."""
    scenario = load_scenario(point.scenario)
    top = {k: v for k, v in point.params.items() if k in SCENARIO_KEYS}
    for k, v in top.items():
        ok = isinstance(v, SCENARIO_KEYS[k]) and not isinstance(v, bool)
        if not ok or (SCENARIO_KEYS[k] is int and v < (0 if k == "warmup_pods" else 1)):
            raise SweepError(f"grid {k} = {v!r} is not a valid {SCENARIO_KEYS[k].__name__}")
    if top.get("boot", "restore") not in ("restore", "cold"):
        raise SweepError(f"grid boot must be restore or cold, got {top['boot']!r}")
    scenario = replace(scenario, **top)
    if point.chains:
        bad = [c for c in point.chains if c not in scenario.chains]
        if bad:
            raise SweepError(f"chains {bad} are not in scenario {scenario.name}")
        scenario = replace(scenario, chains=point.chains)
    if scenario.memory_at and max(scenario.memory_at) > scenario.pods:
        scenario = replace(scenario, memory_at=())
    sim = {k: v for k, v in point.params.items() if k not in SCENARIO_KEYS}
    return scenario, settings_for(scenario, sim)


def run_point(point: Point) -> list[dict[str, Any]]:
    """Simulate one point (in a worker process); returns one headline row per chain."""
    from reports.schema import load_run
    from reports.summary import summarize

    scenario, settings = prepare(point)
    t0 = time.perf_counter()
    paths = simulate_scenario(scenario, settings, point.out, progress=None)
    wall = time.perf_counter() - t0
    rows = []
    for p in paths:
        run = load_run(p)
        s = summarize(run)  # uses run.json's cluster-wide aggregate for large runs
        rows.append({"point": point.name, **point.params, "chain": s["chain"],
                     "flavor": s["flavor"], "pods": s["pods"],
                     "run_pod_p50_ms": s["run_pod_sandbox_ms"]["p50"],
                     "run_pod_p95_ms": s["run_pod_sandbox_ms"]["p95"],
                     "run_pod_p99_ms": s["run_pod_sandbox_ms"].get("p99"),
                     "pods_per_s": s["pods_per_s"],
                     "create_start_p50_ms": s["create_start_container_ms"]["p50"],
                     "mgmt_pss_mb_per_pod": s.get("mgmt_pss_mb_per_pod"),
                     "path": str(p), "wall_s": round(wall, 3)})
    return rows


def _local(points: list[Point], workers: int) -> Iterator[list[dict[str, Any]]]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futs = [pool.submit(run_point, p) for p in points]
        for f in as_completed(futs):
            yield f.result()


def _dask(points: list[Point], address: str,
          connect_timeout: float = 20.0) -> Iterator[list[dict[str, Any]]]:
    from distributed import Client, as_completed as dask_completed

    with Client(address, timeout=f"{connect_timeout}s") as client:
        futs = client.map(run_point, points, pure=False)
        for f in dask_completed(futs):
            yield f.result()


def run_sweep(sweep: Sweep, out: str | Path, workers: int | None = None,
              scheduler: str | None = None, progress: bool = True,
              connect_timeout: float = 20.0) -> pd.DataFrame:
    points = sweep.points(str(out))
    for p in points:  # reject bad points before spending any worker time
        prepare(p)
    Path(out).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    it = (_dask(points, scheduler, connect_timeout) if scheduler
          else _local(points, workers or os.cpu_count() or 1))
    for n, got in enumerate(it, start=1):
        rows.extend(got)
        if progress:
            print(f"sweep {sweep.name}: {n}/{len(points)} points "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows).sort_values(["point", "chain"]).reset_index(drop=True)
    df.to_parquet(Path(out) / "sweep.parquet", index=False)
    index = {"name": sweep.name, "scenario": sweep.scenario, "grid": sweep.grid,
             "seeds": sweep.seeds, "executor": scheduler or f"local x{workers or os.cpu_count()}",
             "points": [{"name": p.name, "params": p.params, "dir": p.out} for p in points],
             "results": json.loads(df.to_json(orient="records"))}
    (Path(out) / "sweep.json").write_text(json.dumps(index, indent=1) + "\n")
    return df


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep TOML file")
    ap.add_argument("--out", required=True, help="output directory (one sub-dir per point)")
    ap.add_argument("--workers", type=int, help="local worker processes (default: cores)")
    ap.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://HOST:8786")
    ap.add_argument("--connect-timeout", type=float, default=20.0,
                    help="seconds to wait for the Dask scheduler (default 20)")
    ap.add_argument("--quiet", action="store_true")
    ns = ap.parse_args(argv)
    if ns.workers is not None and ns.workers < 1:
        print("chainbench sweep: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep(ns.sweep)
        df = run_sweep(sweep, ns.out, ns.workers, ns.scheduler, progress=not ns.quiet,
                       connect_timeout=ns.connect_timeout)
    except (SweepError, ScenarioError, *INPUT_ERRORS) as exc:
        print(f"chainbench sweep: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a scheduler that cannot be reached surfaces as OSError (TimeoutError included)
        print(f"chainbench sweep: {exc}", file=sys.stderr)
        return 2
    cols = ["point", "chain", "run_pod_p50_ms", "run_pod_p95_ms", "pods_per_s"]
    print(df[cols].to_string(index=False))
    return 0
