"""Owns: the code variants of an A/B bench session (`chainbench bench --variant NAME=TREE`).

A variant is a source tree (a checkout, or a `git archive` export made by `chainbench ab`) whose
daemons a session runs side by side with the other variants' (bench.chains, bench.loaddriver),
plus extra environment for those daemons only (e.g. `CHAINBENCH_SLOWDOWN`).
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.chains import MAX_VARIANTS
from scenarios.loader import ScenarioError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
COMMIT_STAMP = ".chainbench-commit"  # written by `chainbench ab` into an exported tree


@dataclass
class Variant:
    """A code revision benched side by side with others in one session."""

    name: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)
    commit: str = ""


def parse_variants(specs: list[str] | None, envs: list[str] | None) -> list[Variant]:
    """`NAME=TREE` and `NAME:KEY=VALUE` options -> variants (ScenarioError on bad input)."""
    out: dict[str, Variant] = {}
    for spec in specs or []:
        name, sep, tree = spec.partition("=")
        if not sep or not _NAME.match(name):
            raise ScenarioError(f"--variant takes NAME=TREE with NAME a short identifier, "
                                f"got {spec!r}")
        if name in out:
            raise ScenarioError(f"variant {name!r} given twice")
        path = Path(tree).resolve()
        if not (path / "bench" / "cli.py").is_file():
            raise ScenarioError(f"variant {name}: {path} is not a chainbench source tree "
                                "(no bench/cli.py)")
        out[name] = Variant(name=name, tree=path, commit=_tree_commit(path))
    for item in envs or []:
        name, sep, kv = item.partition(":")
        key, sep2, val = kv.partition("=")
        if not sep or not sep2 or not key:
            raise ScenarioError(f"--variant-env takes NAME:KEY=VALUE, got {item!r}")
        if name not in out:
            raise ScenarioError(f"--variant-env {item!r}: no variant {name!r}")
        out[name].env[key] = val
    if len(out) == 1:
        raise ScenarioError("--variant needs at least two variants to compare")
    if len(out) > MAX_VARIANTS:
        raise ScenarioError(f"at most {MAX_VARIANTS} variants")
    return list(out.values())


def _tree_commit(tree: Path) -> str:
    """The commit a tree was exported or checked out from ("-dirty" with local changes);
    '' when unknown."""
    stamp = tree / COMMIT_STAMP
    if stamp.is_file():
        return stamp.read_text().strip()
    if not (tree / ".git").exists():
        return ""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=tree, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
