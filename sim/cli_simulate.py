"""Owns: the `chainbench simulate SCENARIO --out DIR` command.

Writes one run directory per modelled chain, DIR/<chain>/, in the bench schema with
`source: "sim"`, so `chainbench summary DIR` reads bench and sim alike.  The scenario's [sim]
table holds model-only settings (sim.scenario_model); `--set key=value` overrides any of them
for one run (`--set cores=8 --set nodes=100`).
"""
from __future__ import annotations

import argparse
import sys
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
                      progress: Any = stderr_progress) -> list[Path]:
    """Simulate every modelled chain of `scenario`; returns the run directories written."""
    cal = cal or load_calibration(settings.calibration or None)
    wanted = chains or modelled_chains(scenario, cal)
    skipped = [c for c in scenario.chains if c not in wanted]
    if progress and skipped:
        progress(f"simulate: no model for {', '.join(skipped)} ({scenario.flavor}); skipped")
    if not wanted:
        raise SimulationError(f"the calibration models none of the chains {list(scenario.chains)}"
                              f" for flavor {scenario.flavor}")
    paths = []
    for chain in wanted:
        run = simulate_chain(scenario, settings, cal, chain, progress)
        paths.append(write_chain_run(
            Path(out) / chain, scenario=scenario, chain=chain, flavor=scenario.flavor,
            pods=run.pods, spans=run.spans, memory=run.memory, cpu=run.cpu, extra=run.extra,
            total_pods=run.total_pods, histograms=run.histograms, ledger=run.ledger,
            accel=str(cal.host.get("accel", "")) if scenario.flavor == "microvm" else ""))
    return paths


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
                                  progress=None if ns.quiet else stderr_progress)
    except INPUT_ERRORS as exc:
        print(f"chainbench simulate: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
