"""Owns: the main job (`chainbench run [SCENARIO]`): bench, simulate, report, headline.

One command a new user runs first: it benches the scenario's chains for real (interleaved, one
run), simulates the same scenario with the shipped calibration, writes a report that overlays
both, and prints where the report is and the headline comparison.  Results land in
`results/<UTC time>-<scenario>/` with `results/latest` pointing at the newest run, which is
where the notebooks look by default.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from scenarios.loader import DEFAULT_SCENARIO, ScenarioError

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "results"


def _say(t0: float, msg: str) -> None:
    print(f"[run {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _headline(summary: dict[str, Any]) -> list[str]:
    bench = {r["chain"]: r for r in summary["runs"] if r["source"] == "bench"}
    sim = {r["chain"]: r for r in summary["runs"] if r["source"] == "sim"}
    lines = []

    def p50(r: dict[str, Any] | None) -> float | None:
        return (r or {}).get("run_pod_sandbox_ms", {}).get("p50")

    for chain, r in bench.items():
        mem = r.get("mgmt_pss_mb_per_pod")
        mem_s = "-" if mem is None else f"{mem:.2f} MB"
        sim_p50 = p50(sim.get(chain))
        sim_s = "" if sim_p50 is None else f", simulated p50 {sim_p50:.1f} ms"
        lines.append(f"  {chain:10} RunPodSandbox p50 {p50(r) or float('nan'):7.1f} ms, "
                     f"{r.get('pods_per_s') or 0:.2f} pods/s, mgmt PSS/pod {mem_s}, "
                     f"procs/pod {r.get('mgmt_procs_per_pod')}, errors {r['errors']}{sim_s}")
    a, b, c = p50(bench.get("sandbox")), p50(bench.get("shim")), p50(bench.get("containerd"))
    if a and b:
        lines.append(f"  sandbox chain / shim chain RunPodSandbox p50 = {a / b:.2f}")
    if b and c:
        lines.append(f"  shim chain / real containerd RunPodSandbox p50 = {b / c:.2f}")
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench run", description=__doc__.split("\n")[0])
    ap.add_argument("scenario", nargs="?", default=str(DEFAULT_SCENARIO),
                    help="scenario file or shipped name (default: runc-seq)")
    ap.add_argument("--chain", default="", help="comma list of chains (default: the scenario's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default: results/<time>-<scenario>)")
    ap.add_argument("--pods", type=int, default=None, help="override the scenario's pod count")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulation")
    ns = ap.parse_args(argv)

    from bench import loaddriver
    from reports.report import build_report
    from reports.summary import summarize_paths

    t0 = time.monotonic()
    bench_args = [ns.scenario, "--out", "PLACEHOLDER"]
    if ns.chain:
        bench_args += ["--chain", ns.chain]
    if ns.pods is not None:
        bench_args += ["--pods", str(ns.pods)]
    try:
        opts = loaddriver.parse_args(bench_args)
    except ScenarioError as exc:
        print(f"chainbench run: {exc}", file=sys.stderr)
        return 2
    sc = opts.scenario
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ns.out or RESULTS / f"{stamp}-{sc.name}"
    if out.exists() and any(out.iterdir()):
        print(f"chainbench run: {out} exists and is not empty", file=sys.stderr)
        return 2
    opts.out = out / "bench"
    _say(t0, f"1/3 bench {sc.name}: chains {opts.chains}, {sc.pods} pods, "
             f"concurrency {sc.concurrency} -> {opts.out}")
    rc = asyncio.run(loaddriver.run_bench(opts))
    if rc != 0:
        print(f"chainbench run: the bench step failed (exit {rc}); partial results in {out}",
              file=sys.stderr)
        return rc
    paths = [opts.out]
    if not ns.no_sim:
        import dataclasses

        from sim.cli_simulate import settings_for, simulate_scenario

        sim_dir = out / "sim"
        # containerd is a peer we measure, not a chain we model.
        sim_chains = tuple(c for c in opts.chains if c != "containerd")
        _say(t0, f"2/3 simulate {sc.name} for {list(sim_chains)} -> {sim_dir}")
        sim_sc = dataclasses.replace(sc, chains=sim_chains)
        simulate_scenario(sim_sc, settings_for(sim_sc), sim_dir, chains=list(sim_chains))
        paths.append(sim_dir)
    report_dir = out / "report"
    _say(t0, f"3/3 report -> {report_dir}")
    build_report([str(p) for p in paths], report_dir, title=f"chainbench run: {sc.name}")
    latest = RESULTS / "latest"
    if out.parent == RESULTS:
        tmp = RESULTS / f".latest-{os.getpid()}"
        tmp.symlink_to(out.name)
        tmp.replace(latest)  # atomic: notebooks never see a missing link
    summary = summarize_paths([str(p) for p in paths])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nchainbench run {sc.name} finished in {time.monotonic() - t0:.0f} s")
    print("\n".join(_headline(summary)))
    print(f"\nreport: {report_dir / 'report.html'}\n        {report_dir / 'report.md'}")
    print(f"data:   {out} (chainbench summary {out})")
    return 0
