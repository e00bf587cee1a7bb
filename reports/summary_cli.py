"""Owns: the `chainbench summary DIR... [--json]` command."""
from __future__ import annotations

import argparse
import json
import sys

from reports.schema import SchemaError
from reports.summary import render_table, summarize_paths


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench summary", description=__doc__)
    ap.add_argument("dirs", nargs="+", help="run directories (or directories holding runs)")
    ap.add_argument("--json", action="store_true", help="print the stable JSON object")
    ns = ap.parse_args(argv)
    try:
        summary = summarize_paths(ns.dirs)
    except SchemaError as exc:
        print(f"chainbench summary: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(summary, indent=2, sort_keys=False))
    else:
        print(render_table(summary))
    return 0
