"""Owns: the shim executable's command line (Go `flag` syntax, as containerd passes it) and the
dispatch to the `start` / `delete` actions or the daemon; also the wrapper script that gives the
shim a binary path until a console entry point exists.

    <shim> -namespace NS -address A -publish-binary B -id ID [-debug] start     (cwd = bundle)
    <shim> -namespace NS -address A -publish-binary B -id ID -bundle P delete
    <shim> -namespace NS -address A -id ID [-debug]                             (daemon; fd 3)

Environment read by the shim (inherited from the engine; none is required):
  CHAINBENCH_VMSHIM_DIR   runtime dir for sockets and VM work dirs (default /run/chainbench/vmshim)
  CHAINBENCH_TRACE_DIR    span directory (or flag -trace-dir)
  CHAINBENCH_VM_BACKEND   qemu | host       (see bench.vmshim.vm for the precedence rules)
  CHAINBENCH_VM_BOOT      restore | cold

Start and delete run in a fresh interpreter per call, so this module and `launch` import
nothing heavy (no protobuf, no asyncio) on the `start` path.
"""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

SHIM_NAME = "containerd-shim-chainbench-vm-v2"
VERSION = "chainbench-vmshim 0.1"

_STRING_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket", "trace-dir"}
_BOOL_FLAGS = {"debug", "v"}
ACTIONS = ("start", "delete")


class UsageError(ValueError):
    pass


@dataclass
class Flags:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    trace_dir: str = ""
    debug: bool = False
    version: bool = False
    action: str = ""  # "" = run as the daemon


def parse_flags(argv: list[str]) -> Flags:
    """Go `flag` rules: `-name value`, `-name=value`, `--name` alike; flags stop at the first
    positional argument, which is the action."""
    f = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            on = value.lower() not in ("false", "0", "f") if eq else True
            if name == "debug":
                f.debug = on
            else:
                f.version = on
            i += 1
            continue
        if name not in _STRING_FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise UsageError(f"flag needs an argument: -{name}")
            value = argv[i]
        setattr(f, name.replace("-", "_"), value)
        i += 1
    rest = argv[i + 1:] if i < len(argv) and argv[i] == "--" else argv[i:]
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments after the action: {rest[1:]}")
    if rest:
        if rest[0] not in ACTIONS:
            raise UsageError(f"unknown action {rest[0]!r}; want one of {ACTIONS}")
        f.action = rest[0]
    return f


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as exc:
        print(f"{SHIM_NAME}: {exc}", file=sys.stderr)
        return 2
    if flags.version:
        print(f"{SHIM_NAME}:\n  Version: {VERSION}")
        return 0
    if not flags.trace_dir:
        flags.trace_dir = os.environ.get("CHAINBENCH_TRACE_DIR", "")
    from bench.vmshim import launch

    try:
        if flags.action == "start":
            return launch.action_start(flags)
        if flags.action == "delete":
            return launch.action_delete(flags)
    except launch.ShimFailure as exc:
        print(f"{SHIM_NAME} {flags.action}: {exc}", file=sys.stderr)
        return 1
    from bench.vmshim import daemon

    return daemon.run_daemon(flags)


def ensure_shim_binary(directory: str | os.PathLike[str] | None = None) -> Path:
    """An executable `containerd-shim-chainbench-vm-v2` that runs this package with the current
    interpreter: what the engine's `shim_binary` points at until pyproject has an entry point.

    Default directory: $CHAINBENCH_CACHE/bin (default /var/cache/chainbench/bin)."""
    if directory is None:
        directory = Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench")) / "bin"
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / SHIM_NAME
    import sysconfig
    root = str(Path(__file__).resolve().parent.parent.parent)  # the tree bench/ is in
    paths = [root] + list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    for p in [sys.executable, *paths]:
        if any(c in p for c in "'\"$`\\:\n"):
            raise ValueError(f"cannot put path {p!r} into the shim wrapper")
    # -S: no `site` (this venv's editable-install hook alone costs ~40 ms per interpreter, and
    # a shim start runs two); the paths it would add come from PYTHONPATH instead: the
    # caller's first (an A/B run points it at another tree), then ours.  `-Sm` keeps
    # "bench.vmshim" at argv[2], where process probes look for it.  exec keeps the pid: the
    # process the engine spawned is the shim itself.
    text = ("#!/bin/sh\n"
            f"export PYTHONPATH=\"${{PYTHONPATH:+$PYTHONPATH:}}{':'.join(paths)}\"\n"
            f"exec '{sys.executable}' -Sm bench.vmshim \"$@\"\n")
    try:
        if path.read_text() == text and os.access(path, os.X_OK):
            return path
    except OSError:
        pass
    tmp = d / f".{SHIM_NAME}.{os.getpid()}"
    tmp.write_text(text)
    tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, path)
    return path
