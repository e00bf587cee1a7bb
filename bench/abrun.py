"""Owns: A/B benchmarking of two code revisions interleaved in one session, judged by the gate.

`chainbench ab --baseline REV --candidate REV [SCENARIO]` exports each revision's tree with
`git archive`, then runs `chainbench bench` from each tree in alternating order (A B, B A, ...),
so slow drift of a shared machine lands on both sides alike, and finally hands all rounds to
`chainbench gate` (permutation test + noise floor).  Options the gate knows (`--noise-floor`,
`--metrics`, ...) are passed through.  `--candidate-env KEY=VALUE` runs the candidate with an
extra environment variable: with `CHAINBENCH_SLOWDOWN=task.create:0.3` on the same revision this
is the proof that the gate catches a real 30% step slowdown.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"  # the checkout as it is on disk, uncommitted changes included


class AbError(RuntimeError):
    pass


@dataclass
class Side:
    name: str  # baseline | candidate
    rev: str
    tree: Path = Path()
    commit: str = ""
    env: dict[str, str] = field(default_factory=dict)
    outs: list[Path] = field(default_factory=list)


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise AbError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def export_tree(rev: str, dest: Path) -> tuple[Path, str]:
    """A clean copy of `rev`'s files (no .git, no venv); the WORKTREE is used in place."""
    if rev == WORKTREE:
        return REPO_ROOT, "worktree"
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = dest / commit[:12]
    if not tree.exists():
        tmp = dest / f".{commit[:12]}.tar"
        with open(tmp, "wb") as fh:
            rc = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO_ROOT,
                                stdout=fh).returncode
        if rc != 0:
            raise AbError(f"git archive {commit} failed")
        staging = dest / f".{commit[:12]}"
        with tarfile.open(tmp) as tf:
            tf.extractall(staging, filter="data")
        tmp.unlink()
        staging.rename(tree)
    if not (tree / "bench" / "loaddriver.py").exists():
        raise AbError(f"revision {rev} ({commit[:12]}) has no load driver: cannot bench it")
    return tree, commit


def run_side(side: Side, scenario: str, chains: str, out: Path, pods: int | None) -> None:
    cmd = [sys.executable, "-m", "bench.cli", "bench", scenario, "--chain", chains,
           "--out", str(out)]
    if pods is not None:
        cmd += ["--pods", str(pods)]
    env = dict(os.environ)
    # cwd and PYTHONPATH both point at the side's tree: `python -m` puts cwd first on sys.path,
    # and the daemons the load driver starts inherit both, so every process runs that revision.
    env["PYTHONPATH"] = str(side.tree)
    env.update(side.env)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=side.tree, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise AbError(f"{side.name} ({side.rev}) bench failed with exit {proc.returncode}")
    print(f"ab: {side.name:9} {side.rev} -> {out} ({time.monotonic() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    side.outs.append(out)


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise AbError(f"--candidate-env/--baseline-env take KEY=VALUE, got {p!r}")
        out[k] = v
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="chainbench ab", description=__doc__.split("\n")[0],
        epilog="Unknown options are passed to `chainbench gate` (e.g. --noise-floor 0.1).")
    ap.add_argument("scenario", nargs="?", default="runc-seq")
    ap.add_argument("--baseline", required=True, help=f"git revision, or {WORKTREE}")
    ap.add_argument("--candidate", required=True, help=f"git revision, or {WORKTREE}")
    ap.add_argument("--chain", default="shim,sandbox", help="chains to bench (shim,sandbox)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds (order alternates)")
    ap.add_argument("--pods", type=int, default=None, help="override the scenario's pods")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: temp)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="independent A/B comparisons to make; with the same code on both "
                         "sides the share that fails is the gate's false-alarm rate")
    ap.add_argument("--baseline-env", action="append", metavar="KEY=VALUE")
    ap.add_argument("--candidate-env", action="append", metavar="KEY=VALUE")
    ns, gate_args = ap.parse_known_args(argv)
    from reports import gate
    from scenarios.loader import ScenarioError, load_scenario

    try:
        if ns.rounds < 1 or ns.repeat < 1:
            raise AbError("--rounds and --repeat must be >= 1")
        # Both sides get the very same scenario file (from this checkout), so only code differs.
        scenario = load_scenario(ns.scenario).path
        base = Side("baseline", ns.baseline, env=_env_pairs(ns.baseline_env))
        cand = Side("candidate", ns.candidate, env=_env_pairs(ns.candidate_env))
        work = Path(tempfile.mkdtemp(prefix="chainbench-ab-"))
        out = ns.out or work / "runs"
        try:
            for side in (base, cand):
                side.tree, side.commit = export_tree(side.rev, work)
            print(f"ab: baseline {base.rev} ({base.commit[:12]}), candidate {cand.rev} "
                  f"({cand.commit[:12]}{', env ' + str(cand.env) if cand.env else ''}), "
                  f"{ns.rounds} round(s) of {Path(scenario).stem}", file=sys.stderr)
            failed = 0
            for k in range(ns.repeat):
                for side in (base, cand):
                    side.outs = []
                for i in range(ns.rounds):
                    order = (base, cand) if i % 2 == 0 else (cand, base)
                    for side in order:
                        run_side(side, scenario, ns.chain, out / f"{k}" / f"{side.name}-{i}",
                                 ns.pods)
                gate_argv = ["--baseline", *map(str, base.outs), "--candidate",
                             *map(str, cand.outs), *gate_args]
                rc = gate.main(gate_argv)
                if rc not in (0, 1):
                    return rc
                failed += rc
            if ns.repeat > 1:
                print(f"ab: {failed}/{ns.repeat} comparisons flagged a regression"
                      + (" (false-alarm rate: both sides run the same code)"
                         if base.commit == cand.commit and base.env == cand.env else ""))
            return 1 if failed else 0
        finally:
            shutil.rmtree(work, ignore_errors=True)  # exported trees (and runs unless --out)
    except (AbError, ScenarioError) as exc:
        print(f"chainbench ab: {exc}", file=sys.stderr)
        return 2
