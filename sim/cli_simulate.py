"""Owns: the `chainbench simulate SCENARIO --out DIR` command.

Writes one run directory per modelled chain, DIR/<chain>/, in the bench schema with
`source: "sim"`, so `chainbench summary DIR` reads bench and sim alike.  The scenario's [sim]
table holds model-only settings (sim.scenario_model); `--set key=value` overrides any of them
for one run (`--set cores=8 --set nodes=100`).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from scenarios.loader import Scenario, ScenarioError, load_scenario
from sim.arrival import ArrivalError
from sim.calibration import Calibration, CalibrationError, load_calibration
from sim.chains import ChainError
from sim.cluster import SimulationError, modelled_chains, simulate_chain, stderr_progress
from sim.output import write_chain_run
from sim.scenario_model import SettingsError, SimSettings, parse_assignment, parse_settings

# Errors that mean "bad input" (exit 2 with a message), never a traceback.
INPUT_ERRORS = (ScenarioError, SettingsError, CalibrationError, ChainError, ArrivalError,
                SimulationError)


def settings_for(scenario: Scenario, overrides: dict[str, Any] | None = None) -> SimSettings:
    table = dict(scenario.sim)
    for k, v in (overrides or {}).items():
        if k.startswith("step_ms."):
            table.setdefault("step_ms", {})
            table["step_ms"] = dict(table["step_ms"], **{k.split(".", 1)[1]: v})
        else:
            table[k] = v
    return parse_settings(table, scenario.path)


def simulate_scenario(scenario: Scenario, settings: SimSettings, out: str | Path,
                      cal: Calibration | None = None, chains: list[str] | None = None,
                      progress: Any = stderr_progress, parallel: bool = False) -> list[Path]:
    """Simulate every modelled chain of `scenario`; returns the run directories written.

    `parallel`: a large run may simulate its chains in one process each (the command line
    asks for it; library callers such as sweeps, which parallelise runs already, do not)."""
    cal = cal or load_calibration(settings.calibration or None)
    wanted = chains or modelled_chains(scenario, cal)
    skipped = [c for c in scenario.chains if c not in wanted]
    if progress and skipped:
        progress(f"simulate: no model for {', '.join(skipped)} ({scenario.flavor}); skipped")
    if not wanted:
        raise SimulationError(f"the calibration models none of the chains {list(scenario.chains)}"
                              f" for flavor {scenario.flavor}")
    args = [(scenario, settings, cal, chain, Path(out), progress) for chain in wanted]
    workers = _chain_workers(scenario, settings, args) if parallel else 1
    if workers <= 1:
        return [_simulate_one(*a) for a in args]
    # Chains of a scenario are independent models with their own random streams (keyed by
    # chain), so running them side by side gives the same runs as one after the other.  Fork:
    # the parent has started no threads yet (no Parquet written), and children need no import.
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("fork")) as ex:
        return [f.result() for f in [ex.submit(_simulate_one, *a) for a in args]]


# A large multi-chain run (cluster-1m: 2 x 1,000,000 pods) runs one process per chain when the
# machine has the cores: each chain's model is single-threaded numpy.  Below this many pods a
# process costs more than it saves.
PARALLEL_MIN_PODS = 200_000


def _chain_workers(scenario: Scenario, settings: SimSettings, args: list[tuple]) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if (len(args) < 2 or cores < 2 or settings.engine != "fast" or sys.platform != "linux"
            or scenario.pods * settings.nodes < PARALLEL_MIN_PODS
            or multiprocessing.current_process().daemon):  # daemons may not have children
        return 1
    try:
        pickle.dumps(args)  # a test's progress lambda cannot cross processes: run serially
    except (pickle.PicklingError, AttributeError, TypeError):
        return 1
    return min(len(args), cores)


def _simulate_one(scenario: Scenario, settings: SimSettings, cal: Calibration, chain: str,
                  out: Path, progress: Any) -> Path:
    run = simulate_chain(scenario, settings, cal, chain, progress)
    return write_chain_run(
        out / chain, scenario=scenario, chain=chain, flavor=scenario.flavor,
        pods=run.pods, spans=run.spans, memory=run.memory, cpu=run.cpu, extra=run.extra,
        total_pods=run.total_pods, histograms=run.histograms, ledger=run.ledger,
        accel=str(cal.host.get("accel", "")) if scenario.flavor == "microvm" else "")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", help="scenario file or shipped name (runc-c10, cluster-1m)")
    ap.add_argument("--out", required=True, help="output directory (one sub-dir per chain)")
    ap.add_argument("--calibration", help="calibration JSON (default: [sim] calibration, "
                                          "else scenarios/calibration-runc.json)")
    ap.add_argument("--chain", action="append", help="simulate only this chain (repeatable)")
    ap.add_argument("--seed", type=int, help="random seed (default: [sim] seed, else 1)")
    ap.add_argument("--engine", choices=("fast", "naive"), help="fast model or SimPy reference")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [sim] setting, e.g. cores=8, vm_boot_ms=300, "
                         "step_ms.task.create=10")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ns = ap.parse_args(argv)
    try:
        scenario = load_scenario(ns.scenario)
        overrides = dict(parse_assignment(a) for a in ns.set)
        if ns.seed is not None:
            overrides["seed"] = ns.seed
        if ns.engine:
            overrides["engine"] = ns.engine
        if ns.calibration:
            overrides["calibration"] = ns.calibration
        settings = settings_for(scenario, overrides)
        if ns.chain:
            bad = [c for c in ns.chain if c not in scenario.chains]
            if bad:
                raise SimulationError(f"--chain {bad} not in the scenario's chains "
                                      f"{list(scenario.chains)}")
            scenario = replace(scenario, chains=tuple(ns.chain))
        paths = simulate_scenario(scenario, settings, ns.out, chains=ns.chain,
                                  progress=None if ns.quiet else stderr_progress, parallel=True)
    except INPUT_ERRORS as exc:
        print(f"chainbench simulate: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
