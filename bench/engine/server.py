"""Owns: the `chainbench engine` process: wiring, the gRPC server on a unix socket, signals.

    chainbench engine --config FILE [--teardown] [--teardown-on-exit] [-v]

Serves CRI `runtime.v1.RuntimeService` (all configured runtimes) and `runtime.v1alpha2`
(shim chain only, like iSulad).  On start it recovers the pods in its state dir.  SIGTERM /
SIGINT stop serving and exit 0, leaving pods running for the next engine; `--teardown-on-exit`
removes every pod first.  `--teardown` recovers, stops and removes every pod, and exits
without serving — the RPC-free way to clean a state dir.  Shims publish their events to
`<state_dir>/events.sock`, served here.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from bench.engine.config import ConfigError, EngineConfig, load_config
from bench.engine.controller import Controller
from bench.engine.cri import RuntimeServicer
from bench.engine.manager import SandboxManager
from bench.engine.store import Store
from bench.rpc.schemas import cri_handlers
from bench.tracing import Tracer

log = logging.getLogger("chainbench.engine")


class Engine:
    """Everything one engine process runs; `start()` / `serve_until()` / `stop()`."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.tracer = Tracer.from_dir(cfg.trace_dir or None, "engine")
        self.store = Store(cfg.state_dir)
        self.controllers: dict[str, Controller] = {}
        self.manager: SandboxManager | None = None
        self.server: grpc.aio.Server | None = None
        self.events = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def events_path(self) -> str:
        return str(Path(self.cfg.state_dir) / "events.sock")

    def _build_controllers(self) -> None:
        for name, rt in self.cfg.runtimes.items():
            if rt.controller == "shim":
                from bench.engine.shim_controller import ShimController
                self.controllers[name] = ShimController(self.cfg, rt, self.store, self.tracer,
                                                        self.events_path)
            else:
                from bench.engine.sandboxer_controller import SandboxerController
                self.controllers[name] = SandboxerController(self.cfg, rt, self.store,
                                                             self.tracer)

    async def start(self, serve: bool = True) -> None:
        self.store.init()
        self._build_controllers()
        if any(rt.controller == "shim" for rt in self.cfg.runtimes.values()):
            from bench.runtimes.shimv2 import EventReceiver
            _unlink_socket(self.events_path)
            self.events = await EventReceiver(queue_size=1).start(self.events_path)
            # The queue is not read: events are only accepted so shims do not retry them.
            self.events.queue = _DiscardQueue()
        await asyncio.gather(*(c.init() for c in self.controllers.values()))
        self.manager = SandboxManager(self.cfg, self.store, self.controllers, self.tracer)
        await self.manager.recover()
        if self.tracer.enabled:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        if serve:
            await self._serve()

    async def _serve(self) -> None:
        assert self.manager is not None
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20),
                                          ("grpc.so_reuseport", 0)])
        for h in cri_handlers(RuntimeServicer(self.manager, self.tracer, "v1"), ("v1",)):
            server.add_generic_rpc_handlers((h,))
        for h in cri_handlers(RuntimeServicer(self.manager, self.tracer, "v1alpha2"),
                              ("v1alpha2",)):
            server.add_generic_rpc_handlers((h,))
        Path(self.cfg.listen).parent.mkdir(parents=True, exist_ok=True)
        _unlink_socket(self.cfg.listen)
        server.add_insecure_port(f"unix:{self.cfg.listen}")
        await server.start()
        os.chmod(self.cfg.listen, 0o600)
        self.server = server
        log.info("engine serving CRI on %s", self.cfg.listen)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.trace_flush_s)
            await asyncio.to_thread(self.tracer.flush)

    async def stop(self, teardown: bool = False) -> int:
        rc = 0
        if self.server is not None:
            await self.server.stop(grace=2.0)
        if self.manager is not None:
            if teardown:
                errors = await self.manager.remove_all()
                for e in errors:
                    log.error("teardown: %s", e)
                rc = 1 if errors else 0
            await self.manager.close()
        await asyncio.gather(*(c.close() for c in self.controllers.values()),
                             return_exceptions=True)
        if self.events is not None:
            await self.events.close()
            _unlink_socket(self.events_path)
        if self.server is not None:
            _unlink_socket(self.cfg.listen)
        if self._flusher is not None:
            self._flusher.cancel()
        self.tracer.flush()
        return rc


class _DiscardQueue:
    def put_nowait(self, item: object) -> None:
        return None


def _unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _run(cfg: EngineConfig, teardown_only: bool, teardown_on_exit: bool) -> int:
    engine = Engine(cfg)
    if teardown_only:
        await engine.start(serve=False)
        return await engine.stop(teardown=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await engine.start()
    except BaseException:
        await engine.stop()
        raise
    await stop.wait()
    log.info("engine stopping")
    return await engine.stop(teardown=teardown_on_exit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chainbench engine",
                                 description="Run the iSulad-like CRI engine (runtime.v1 + "
                                             "v1alpha2) on a unix socket.")
    ap.add_argument("--config", required=True, help="engine TOML config")
    ap.add_argument("--teardown", action="store_true",
                    help="recover, stop and remove every pod, then exit (no serving)")
    ap.add_argument("--teardown-on-exit", action="store_true",
                    help="on SIGTERM/SIGINT remove every pod before exiting")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s engine %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"chainbench engine: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(cfg, args.teardown, args.teardown_on_exit))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
