"""Owns: the `chainbench` command line: the table of subcommands and their dispatch.

Each subcommand lives in the module that owns its noun and exposes `main(argv) -> int`; this
file only routes.  Modules are imported lazily so `chainbench summary` does not pay for grpc,
and `chainbench simulate` does not pay for the testbed.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bench.mainjob", "main job: bench both runc chains, simulate, write a report"),
    "bench": ("bench.loaddriver", "bench SCENARIO on real chains, or `bench rpc` for RPC round trips"),
    "summary": ("reports.summary_cli", "print the summary figures of run directories"),
    "report": ("reports.report", "write a Markdown/HTML report with figures from run directories"),
    "gate": ("reports.gate", "compare baseline and candidate runs; exit 1 on a regression"),
    "ab": ("bench.abrun", "A/B-bench two git revisions interleaved, then gate the result"),
    "doctor": ("bench.doctor", "check prerequisites (runc, containerd, shim, QEMU, kernel, accel)"),
    "engine": ("bench.engine.server", "run the CRI engine (iSulad-like)"),
    "sandboxer": ("bench.sandboxer.server", "run the Sandbox API sandboxer (Kuasar-like)"),
    "simulate": ("sim.cli_simulate", "simulate a scenario with the SimPy model"),
    "calibrate": ("sim.calibration", "fit step distributions from bench runs"),
    "validate": ("sim.validation", "calibrate on sequential runs, predict held-out ones"),
    "sweep": ("sim.sweep", "run a grid of simulated scenarios (local or Dask)"),
    "protogen": ("bench.rpc.protogen", "regenerate the committed *_pb2*.py from bench/rpc/pb/*.proto"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: chainbench COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "`chainbench COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"chainbench: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"chainbench {name}: not available in this build ({module_name} missing)",
                  file=sys.stderr)
            return 2
        raise
    entry: Callable[[list[str]], int] = getattr(module, "main")
    try:
        return int(entry(rest) or 0)
    except KeyboardInterrupt:
        print(f"chainbench {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
