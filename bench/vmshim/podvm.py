"""Owns: the shim's side of one pod's VM — launching it through the chosen backend (boot or
restore) with its spans, dialling the guest agent until it answers, watching the VM die, and
tearing it down, also when the Create that started it is cancelled half-way.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client, Code, TtrpcError
from bench.tracing import Tracer
from bench.vmshim import launch
from bench.vmshim.vm import VmConfigError, VmError, VmHandle, backend, resolve_options

log = logging.getLogger("chainbench.vmshim.vm")

SERVICE = "containerd.task.v2.Task"


class PodVm:
    """`ensure(call)` once (the sandbox's Create), then `agent` is the relay's connection.

    on_change(): the VM came or went (the shim rewrites its state file);
    on_death(): the VM exited on its own (not through `teardown`)."""

    def __init__(self, pod_id: str, namespace: str, address: str, bundle: str, tracer: Tracer,
                 on_change: Callable[[], None], on_death: Callable[[], None]) -> None:
        self.pod_id = pod_id
        self.namespace = namespace
        self.address = address
        self.bundle = bundle
        self.tracer = tracer
        self.on_change = on_change
        self.on_death = on_death
        self.vm: VmHandle | None = None
        self.agent: Client | None = None
        self.workdir: Path | None = None
        self.gone = asyncio.Event()
        self.exit_ns = 0
        self.stopping = False
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._aborts: set[asyncio.Future[None]] = set()

    def state(self) -> dict[str, Any] | None:
        if self.vm is None:
            return None
        return {**self.vm.describe(), "workdir": str(self.workdir or "")}

    async def ensure(self, call: str) -> Client:
        async with self._lock:
            if self.agent is not None:
                return self.agent
            if self.gone.is_set() or self.stopping:
                raise TtrpcError(Code.UNAVAILABLE, f"the sandbox VM of {self.pod_id} is gone")
            try:
                opts = resolve_options(self.bundle)
            except VmConfigError as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
            workdir = launch.vm_workdir(self.address, self.namespace, self.pod_id)
            shutil.rmtree(workdir, ignore_errors=True)  # a dead shim's leftovers
            workdir.mkdir(parents=True, mode=0o700)
            self.workdir = workdir
            vm: VmHandle | None = None
            try:
                t0 = time.perf_counter_ns()
                try:
                    vm = await backend(opts.backend).launch(self.pod_id, workdir, opts,
                                                            self.tracer, call)
                finally:
                    if vm is None or not vm.ready:  # a failed boot is a span too
                        step = vm.step if vm else \
                            ("vm.restore" if opts.boot == "restore" else "vm.boot")
                        self.tracer.record(self.pod_id, call, step, t0, time.perf_counter_ns(),
                                           component="vmm")
                self.vm = vm
                self.on_change()
                self._watch = asyncio.ensure_future(self._watch_vm(vm))
                if vm.ready:
                    self.agent = await self._dial(vm, opts.agent_timeout_s, probe=False)
                else:
                    with self.tracer.span(self.pod_id, call, "agent.ready"):
                        self.agent = await self._dial(vm, opts.agent_timeout_s)
                log.info("pod %s: %s backend (%s), %s + agent in %.1f ms, agent at %s",
                         self.pod_id, opts.backend, vm.accel or "no accel", vm.step,
                         (time.perf_counter_ns() - t0) / 1e6, vm.agent_address)
                return self.agent
            except BaseException as exc:
                # shielded and remembered: a cancelled Create (deadline, SIGTERM) must still
                # stop the VM it started, and teardown waits for that
                abort = asyncio.ensure_future(self._abort(vm))
                self._aborts.add(abort)
                abort.add_done_callback(self._aborts.discard)
                await asyncio.shield(abort)
                if isinstance(exc, VmError):
                    raise TtrpcError(Code.UNAVAILABLE, f"sandbox VM: {exc}") from None
                raise
            finally:
                self.tracer.flush()

    async def _abort(self, vm: VmHandle | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if vm is not None:
            await vm.stop()
        self.vm = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.on_change()

    async def _dial(self, vm: VmHandle, timeout: float, *, probe: bool = True) -> Client:
        """Connect to the agent and (`probe`) get one Connect answer: the agent is ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        died = asyncio.ensure_future(vm.wait())
        try:
            while True:
                left = deadline - loop.time()
                if died.done():
                    raise VmError(f"the VM exited during boot (status {died.result()})")
                if left <= 0:
                    raise VmError(f"the agent at {vm.agent_address} did not answer "
                                  f"within {timeout:g}s")
                try:
                    client = await Client.connect(vm.agent_address, timeout=min(left, 1.0))
                    break
                except TtrpcError:
                    await asyncio.sleep(0.002)
            if not probe:
                return client
            call = asyncio.ensure_future(client.call(
                SERVICE, "Connect", pb.ConnectRequest(), pb.ConnectResponse,
                timeout=max(deadline - loop.time(), 0.001)))
            await asyncio.wait({call, died}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.cancel()
                await client.close()
                raise VmError(f"the VM exited during boot (status {died.result()})")
            try:
                call.result()
            except TtrpcError as exc:
                await client.close()
                raise VmError(f"the agent at {vm.agent_address} failed Connect: {exc}") from None
            return client
        finally:
            died.cancel()

    async def _watch_vm(self, vm: VmHandle) -> None:
        status = await vm.wait()
        self.exit_ns = time.time_ns()
        self.gone.set()
        if not self.stopping:
            log.warning("pod %s: the VM (pid %d) exited with status %s", self.pod_id, vm.pid,
                        status)
            self.on_death()

    async def teardown(self) -> None:
        """Stop the VM and remove its work dir; idempotent."""
        self.stopping = True
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        if self._watch is not None and not self.gone.is_set():
            self._watch.cancel()
        if self.agent is not None:
            await self.agent.close()
        if self.vm is not None:
            await self.vm.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
