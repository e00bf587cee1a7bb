"""Owns: A/B benchmarking of two code revisions interleaved in one session, judged by the gate.

`chainbench ab --baseline REV --candidate REV [SCENARIO]` exports each revision's tree with
`git archive`, then runs ONE `chainbench bench` session per round in which both revisions are
variants (`--variant baseline=TREE --variant candidate=TREE`): each chain runs once per revision,
with that revision's daemons, block by block back to back (A B, B A, ...), so drift of a shared
machine lands on both sides within seconds.  Separate runs per side were rejected: measured
with the same code on both sides, 3 of 8 comparisons failed, because pods of one run share
machine state that the other run never saw.  All rounds (sessions) go to `chainbench gate`,
which permutes labels only within a session's blocks.  Options the gate knows
(`--noise-floor`, `--metrics`, `--abs-floor-ms`, ...) are passed through.
`--candidate-env KEY=VALUE` gives the candidate's daemons an extra environment variable: with
`CHAINBENCH_SLOWDOWN=task.create:0.3` on the same revision this is the proof that the gate
catches a real 30% step slowdown.  The load driver itself (client, probes) is this checkout's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.variants import COMMIT_STAMP

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
        (staging / COMMIT_STAMP).write_text(commit + "\n")
        staging.rename(tree)
    if not (tree / "bench" / "loaddriver.py").exists():
        raise AbError(f"revision {rev} ({commit[:12]}) has no load driver: cannot bench it")
    return tree, commit


def run_session(sides: tuple[Side, Side], scenario: str, chains: str, out: Path,
                pods: int | None, block: int | None) -> None:
    """One load-driver session with both sides as variants; runs land in out/<side>/<chain>."""
    cmd = [sys.executable, "-m", "bench.cli", "bench", scenario, "--chain", chains,
           "--out", str(out)]
    if pods is not None:
        cmd += ["--pods", str(pods)]
    if block is not None:
        cmd += ["--block", str(block)]
    for side in sides:  # the first variant listed goes first in the first block
        cmd += ["--variant", f"{side.name}={side.tree}"]
        cmd += [a for k, v in side.env.items() for a in ("--variant-env", f"{side.name}:{k}={v}")]
    env = dict(os.environ)
    # The load driver is this checkout's; each variant's daemons get their tree's PYTHONPATH
    # and cwd from the load driver (bench.chains).
    env["PYTHONPATH"] = str(REPO_ROOT)
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    # Output to a file, not a pipe: if `ab` dies, the session must not die of SIGPIPE halfway
    # through its teardown.  Its own session: one Ctrl-C reaches it once, forwarded below.
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            # Ctrl-C or SIGTERM of `ab`: the session tears its chains down before we leave.
            proc.send_signal(signal.SIGINT)
            print(f"ab: interrupted: waiting for the session to clean up (log {log})",
                  file=sys.stderr, flush=True)
            proc.wait()
            raise
    if rc != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise AbError(f"bench session {out} failed with exit {rc} (log {log})")
    print(f"ab: session {' '.join(s.name for s in sides)} -> {out} "
          f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)


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
    ap.add_argument("--rounds", type=int, default=1,
                    help="bench sessions pooled per comparison (which side goes first "
                         "alternates); each holds both sides")
    ap.add_argument("--pods", type=int, default=None, help="override the scenario's pods")
    # Not one pod per block by default: the gate permutes labels within a block, and a block
    # of one pod per side leaves 2^pods sign patterns, too few for any p-value to survive Holm
    # across ~50 metrics at 12 pods (measured: smallest p 0.03 in 30 comparisons).
    ap.add_argument("--block", type=int, default=None,
                    help="pods per interleaving block (default: the bench's, "
                         "max(concurrency, 5)); each block is a stratum of the gate's test")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: temp)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="independent A/B comparisons to make; with the same code on both "
                         "sides the share that fails is the gate's false-alarm rate")
    ap.add_argument("--baseline-env", action="append", metavar="KEY=VALUE")
    ap.add_argument("--candidate-env", action="append", metavar="KEY=VALUE")
    ns, gate_args = ap.parse_known_args(argv)
    old_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(ns, gate_args)
    except KeyboardInterrupt:
        print("chainbench ab: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends `ab` the way Ctrl-C does: sessions clean up first


def _run(ns: argparse.Namespace, gate_args: list[str]) -> int:
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
                  f"{ns.rounds} session(s) of {Path(scenario).stem} per comparison",
                  file=sys.stderr)
            failed = 0
            for k in range(ns.repeat):
                sessions = []
                for i in range(ns.rounds):
                    # Alternate which side goes first across sessions (and repeats).
                    order = (base, cand) if (i + k) % 2 == 0 else (cand, base)
                    sessions.append(out / f"{k}" / f"session-{i}")
                    run_session(order, scenario, ns.chain, sessions[-1], ns.pods, ns.block)
                gate_argv = ["--baseline", *(str(s / base.name) for s in sessions),
                             "--candidate", *(str(s / cand.name) for s in sessions), *gate_args]
                rc = gate.main(gate_argv)
                if rc not in (0, 1):
                    return rc
                failed += rc
                print(f"ab: comparison {k + 1}/{ns.repeat}: {'FAIL' if rc else 'PASS'} "
                      f"({failed} failed so far)", file=sys.stderr, flush=True)
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
