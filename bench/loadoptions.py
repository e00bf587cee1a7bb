"""Owns: the options of a bench session: its command line and the scenario overrides it applies.

Split from the load driver so `chainbench run` and `chainbench ab` can build the same options
without starting anything.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.chains import RUN_ROOT, chain_available
from bench.variants import Variant, parse_variants
from scenarios.loader import Scenario, ScenarioError, load_scenario
from sim.vocabulary import CHAINS


@dataclass
class Options:
    scenario: Scenario
    chains: list[str]
    out: Path
    schema: str
    block: int
    stop_timeout_s: int
    run_root: Path
    json: bool = False
    variants: list[Variant] = field(default_factory=list)

    def lanes(self) -> list[tuple[Variant | None, str]]:
        if not self.variants:
            return [(None, c) for c in self.chains]
        return [(v, c) for c in self.chains for v in self.variants]

    def lane_out(self, variant: Variant | None, chain: str) -> Path:
        return self.out / chain if variant is None else self.out / variant.name / chain



def parse_args(argv: list[str]) -> Options:
    ap = argparse.ArgumentParser(prog="chainbench bench", description="Run a scenario's CRI load on real chains, interleaved.")
    ap.add_argument("scenario", help="scenario TOML path or name (scenarios/NAME.toml)")
    ap.add_argument("--chain", default="", help="comma list of shim,sandbox,containerd "
                    "(default: the scenario's chains that this build can run)")
    ap.add_argument("--out", required=True, type=Path, help="output dir (one run dir per chain)")
    ap.add_argument("--schema", choices=("legacy", "current"), default=None,
                    help="Sandbox API schema of the sandbox chain (default: the scenario's)")
    ap.add_argument("--pods", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up pods per chain")
    ap.add_argument("--block", type=int, default=None,
                    help="pods per interleaving block (default max(concurrency, 5))")
    ap.add_argument("--stop-timeout", type=int, default=0,
                    help="StopContainer grace seconds (0: SIGKILL at once; sleep ignores TERM)")
    ap.add_argument("--run-root", type=Path, default=RUN_ROOT)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--boot", choices=("restore", "cold"), default=None,
                    help="microvm flavor: override the scenario's boot mode")
    ap.add_argument("--variant", action="append", metavar="NAME=TREE",
                    help="A/B: run every chain once per variant, its daemons from source tree "
                         "TREE (two or more; output DIR/NAME/CHAIN)")
    ap.add_argument("--variant-env", action="append", metavar="NAME:KEY=VALUE",
                    help="extra environment for one variant's daemons; repeatable")
    a = ap.parse_args(argv)
    sc = load_scenario(a.scenario)
    if sc.lifetime_s > 0:
        # The load driver ramps every pod up, samples, then tears them all down; pods that
        # stop while others start are not what it does, and a run must not claim they were.
        raise ScenarioError(f"{sc.name}: lifetime_s = {sc.lifetime_s:g} is not supported by "
                            f"bench (pods are stopped after the ramp); use lifetime_s = 0")
    changes: dict[str, Any] = {}
    if a.pods is not None:
        if a.pods < 1:
            raise ScenarioError("--pods must be >= 1")
        pts = tuple(m for m in sc.memory_at if m <= a.pods)
        changes["pods"] = a.pods
        changes["memory_at"] = tuple(sorted(set(pts) | {a.pods})) if pts else ()
        changes["warmup_pods"] = min(sc.warmup_pods, a.pods - 1)
    if a.concurrency is not None:
        if a.concurrency < 1:
            raise ScenarioError("--concurrency must be >= 1")
        changes["concurrency"] = a.concurrency
    if a.warmup is not None:
        changes["warmup_pods"] = max(0, min(a.warmup, changes.get("pods", sc.pods) - 1))
    if changes:
        sc = dataclasses.replace(sc, **changes)
    if a.chain:
        chains = [c.strip() for c in a.chain.split(",") if c.strip()]
        bad = [c for c in chains if c not in CHAINS]
        if bad:
            raise ScenarioError(f"unknown chains {bad}; known {list(CHAINS)}")
        missing = {c: chain_available(c) for c in chains if chain_available(c)}
        if missing:
            raise ScenarioError(f"chains not available in this build: {missing}")
    else:
        chains = [c for c in sc.chains if not chain_available(c)]
        if not chains:
            raise ScenarioError(f"none of the scenario's chains {list(sc.chains)} is available")
    if len(set(chains)) != len(chains):
        raise ScenarioError(f"chain listed twice: {chains}")
    if sc.flavor == "microvm" and "containerd" in chains:
        if a.chain:
            raise ScenarioError("the containerd peer runs the runc flavor only")
        chains.remove("containerd")
        if not chains:
            raise ScenarioError("no chain of this microvm scenario is available")
    if a.boot:
        sc = dataclasses.replace(sc, boot=a.boot)
    block = a.block if a.block is not None else max(sc.concurrency, 5)
    if block < sc.concurrency:
        # a block smaller than the concurrency would silently lower the concurrency
        raise ScenarioError(f"--block {block} is below the concurrency {sc.concurrency}")
    return Options(scenario=sc, chains=chains, out=a.out, schema=a.schema or sc.schema,
                   block=block, stop_timeout_s=max(0, a.stop_timeout), run_root=a.run_root,
                   json=a.json, variants=parse_variants(a.variant, a.variant_env))
