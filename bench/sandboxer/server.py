"""Owns: the `chainbench sandboxer` process: arguments, the gRPC server on a unix socket,
recovery at start-up and the SIGTERM/SIGINT shutdown.

    chainbench sandboxer --listen SOCK --dir DIR --schema legacy|current [--trace-dir D]
                         [--cleanup-on-exit] [--backend runc|vm] [--vm-boot restore|cold]
                         [--vm-memory-mb N]

`--backend vm` runs each sandbox in a QEMU microVM (bench.sandboxer.vms); with `--vm-boot
restore` the template snapshot is made or found before the socket is served.

On SIGTERM/SIGINT the process stops serving, flushes its spans and exits; sandboxes (pinned
namespaces, containers, task sockets' state) are left for the next sandboxer to recover,
unless --cleanup-on-exit asks to tear every sandbox down first.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.rpc.schemas import SANDBOX_SCHEMAS, controller_handler
from bench.sandboxer.controller import ControllerServicer
from bench.sandboxer.manager import Manager
from bench.tracing import Tracer

log = logging.getLogger("bench.sandboxer")

PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Options:
    listen: str
    dir: str
    schema: str
    trace_dir: str = ""
    cleanup_on_exit: bool = False
    log_level: str = "INFO"
    backend: str = "runc"
    vm_boot: str = "restore"
    vm_memory_mb: int | None = None
    vm_pool: int | None = None  # None: env CHAINBENCH_VM_POOL (bench.sandboxer.vms)
    vm_pool_mode: str | None = None


def parse_args(argv: list[str]) -> Options:
    ap = argparse.ArgumentParser(
        prog="chainbench sandboxer",
        description="Kuasar-like sandboxer: Sandbox API Controller over gRPC on a unix socket, "
                    "runc pods with pinned namespaces, in-process Task API per pod.")
    ap.add_argument("--listen", required=True, help="unix socket path of the Controller")
    ap.add_argument("--dir", required=True, help="working dir: one sub-dir per sandbox")
    ap.add_argument("--schema", required=True, choices=sorted(SANDBOX_SCHEMAS),
                    help="Sandbox API wire generation served on --listen")
    ap.add_argument("--trace-dir", default="", help="write spans here (bench.tracing)")
    ap.add_argument("--cleanup-on-exit", action="store_true",
                    help="tear every sandbox down on SIGTERM/SIGINT instead of leaving them")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--backend", choices=("runc", "vm"), default="runc",
                    help="default sandbox kind (per sandbox: annotation "
                         "io.chainbench.sandbox.backend)")
    ap.add_argument("--vm-boot", choices=("restore", "cold"), default="restore",
                    help="vm backend: restore from a template snapshot or cold boot "
                         "(per sandbox: annotation io.chainbench.vm.boot)")
    ap.add_argument("--vm-memory-mb", type=int, default=None, help="guest RAM (default 128)")
    ap.add_argument("--vm-pool", type=int, default=None, metavar="N",
                    help="vm backend, restore: keep N VMs ready ahead of Start "
                         "(default: env CHAINBENCH_VM_POOL, else 0)")
    ap.add_argument("--vm-pool-mode", choices=("spawned", "restored"), default=None,
                    help="spawned: QEMU up, waiting for the snapshot; restored: restored and "
                         "warm (a VM cache)")
    ns = ap.parse_args(argv)
    if ns.vm_memory_mb is not None and ns.vm_memory_mb <= 0:
        ap.error("--vm-memory-mb must be positive")
    if ns.vm_pool is not None and not 0 <= ns.vm_pool <= 64:
        ap.error("--vm-pool must be in 0..64")
    return Options(ns.listen.removeprefix("unix://"), ns.dir, ns.schema, ns.trace_dir,
                   ns.cleanup_on_exit, ns.log_level, ns.backend, ns.vm_boot, ns.vm_memory_mb,
                   ns.vm_pool, ns.vm_pool_mode)


def _become_subreaper() -> None:
    # Container inits are orphaned when `runc create` exits; as subreaper we inherit and can
    # reap them with their exit status (what containerd's shim does).
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _raise_nofile() -> None:
    # Per pod we hold a listening task socket, the engine's connection to it and a pidfd per
    # container: the default soft limit of 1024 would cap a sandboxer at ~300 pods.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _use_pidfd_child_watcher() -> None:
    # Python 3.11 waits for each runc call on its own thread (ThreadedChildWatcher); under
    # load those threads fight the event loop for the GIL.  A pidfd watcher waits on the loop.
    # (3.12 made it the default and deprecated this call, hence the guards.)
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


async def serve(opts: Options, ready: asyncio.Event | None = None) -> int:
    # Signals first: a SIGTERM that arrives during recovery must still mean a clean exit.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    root = Path(opts.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _become_subreaper()
    _raise_nofile()
    _use_pidfd_child_watcher()
    manager = Manager(root, Tracer.from_dir(opts.trace_dir or None, "sandboxer"),
                      backend=opts.backend, vm_boot=opts.vm_boot,
                      vm_memory_mb=opts.vm_memory_mb, vm_pool=opts.vm_pool,
                      vm_pool_mode=opts.vm_pool_mode)
    if opts.backend == "vm":
        try:
            await manager.vms.prepare()
        except Exception as exc:  # no kernel/initramfs, or the template would not boot
            log.error("vm backend not usable: %s", exc)
            manager.tracer.flush()
            return 1
    await manager.recover()
    servicer = ControllerServicer(manager, opts.schema)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((controller_handler(servicer, opts.schema),))
    listen = os.path.abspath(opts.listen)
    Path(listen).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.unlink(listen)  # stale socket of a previous (killed) sandboxer
    except FileNotFoundError:
        pass
    server.add_insecure_port(f"unix://{listen}")
    await server.start()
    log.info("sandboxer (%s schema) serving on %s, dir %s", opts.schema, listen, root)

    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("sandboxer stopping (cleanup=%s)", opts.cleanup_on_exit)
        # Refuse new calls at once; in-flight ones (e.g. a blocked Wait) are cancelled: the
        # engine sees UNAVAILABLE and retries against the next sandboxer.
        await server.stop(grace=0.5)
        await manager.close(opts.cleanup_on_exit)
        try:
            os.unlink(listen)
        except FileNotFoundError:
            pass
    return 0


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO),
                        format="%(asctime)s sandboxer %(levelname)s %(message)s",
                        stream=sys.stderr)
    if os.geteuid() != 0:
        print("chainbench sandboxer: must run as root (namespaces, mounts, runc)",
              file=sys.stderr)
        return 2
    return asyncio.run(serve(opts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
