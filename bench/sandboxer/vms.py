"""Owns: the sandboxer's microVM backend — one QEMU microVM per sandbox (Kuasar vmm-sandboxer
style): cold boot or restore from a template snapshot on Start, the task address of the guest
agent, the VM's exit as the sandbox's exit, and finding VMs again after a sandboxer restart.

The VM recipe and the snapshot are bench.vm's (the same as the shim chain's microVM flavor, and
the snapshot cache is shared with it: `bench.vmshim.qemu_adapter.snapshot_dir(config)`).  The
template snapshot is made (or found) when the sandboxer starts, so no pod pays for it.

Start returns once the guest agent has answered a Task `Connect` over the VM's agent socket;
that readiness connection is closed before Start answers, because the agent's virtio-serial
port carries one host connection at a time and the engine dials the address itself.
The task address is `ttrpc+unix://<dir>/<id>/agent.sock` (current schema, version 2) or
`unix://...` (legacy).  Spans: `vm.restore`|`vm.boot` (component vmm) and `agent.ready`
(component sandboxer), recorded by bench.vm.qemu inside the sandboxer's `sandbox.start`.

Choice per sandbox, first match wins: annotation `io.chainbench.vm.boot` (restore|cold) on the
Create request or in the PodSandboxConfig; else the sandboxer's `--vm-boot`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bench.processes import ProcessRegistry
from bench.tracing import Tracer
from bench.vm.qemu import MicroVM, Snapshot, VMConfig, VMError, disable_thp_here
from sim.vocabulary import CALL_RUN_POD

log = logging.getLogger("bench.sandboxer.vm")

BACKENDS = ("runc", "vm")
BOOT_MODES = ("restore", "cold")
ANNOTATION_BOOT = "io.chainbench.vm.boot"
ANNOTATION_BACKEND = "io.chainbench.sandbox.backend"
ADOPTED_POLL_S = 0.5  # an adopted QEMU is not our child: its exit is noticed by polling /proc


class _VmRegistry(ProcessRegistry):
    """VMs must outlive a sandboxer that exits without --cleanup-on-exit (the next one recovers
    them), so unlike the default registry this one kills nothing at interpreter exit."""

    def _ensure_atexit(self) -> None:
        return None


def pick(annotations: Mapping[str, str], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = annotations.get(key) or default
    if value not in allowed:
        raise ValueError(f"annotation {key}={value!r}: want one of {allowed}")
    return value


@dataclass
class VmBackend:
    """The VMs of one sandboxer process."""

    tracer: Tracer
    boot: str = "restore"
    memory_mb: int | None = None
    config: VMConfig | None = None
    snapshot: Snapshot | None = None
    registry: ProcessRegistry = field(default_factory=lambda: _VmRegistry("sandboxer-vms"))
    vms: dict[str, MicroVM] = field(default_factory=dict)
    watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _snap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _config(self) -> VMConfig:
        if self.config is None:
            kw: dict[str, Any] = {"memory_mb": self.memory_mb} if self.memory_mb else {}
            # Never builds the kernel here (minutes): the load driver / CI set-up did that.
            self.config = VMConfig.default(build=False, **kw)
            if not self.config.huge_pages:
                disable_thp_here()  # inherited by every VMM: no preexec_fn under gRPC threads
        return self.config

    async def prepare(self) -> None:
        """At sandboxer start: resolve the guest config and, for restore, the snapshot."""
        self._config()
        if self.boot == "restore":
            await self._ensure_snapshot()

    async def _ensure_snapshot(self) -> Snapshot:
        async with self._snap_lock:
            if self.snapshot is None or not self.snapshot.path.is_file():
                from bench.vmshim.qemu_adapter import ensure_snapshot
                from bench.vmshim.vm import VmError
                try:
                    self.snapshot = await ensure_snapshot(self._config())
                except VmError as exc:
                    raise VMError(str(exc)) from None
                log.info("template snapshot %s (%d MB)", self.snapshot.path,
                         self.snapshot.size >> 20)
            return self.snapshot

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, sid: str, workdir: Path, boot: str,
                    on_exit: Callable[[str, int], Any]) -> MicroVM:
        """Boot or restore the sandbox's VM; returns when its agent answers."""
        vm = MicroVM(sid, workdir, self._config(), registry=self.registry, tracer=self.tracer,
                     pod=sid, call=CALL_RUN_POD)
        if boot == "restore":
            snap = await self._ensure_snapshot()
            await vm.restore(snap)
        else:
            await vm.boot()
        self.vms[sid] = vm
        self._watch(sid, vm, on_exit)
        return vm

    def _watch(self, sid: str, vm: MicroVM, on_exit: Callable[[str, int], Any]) -> None:
        async def watch() -> None:
            proc = vm.proc
            if proc is not None:
                rc = await proc.wait()
                status = 128 - rc if rc < 0 else rc  # killed by a signal: 128+N like a shell
            else:
                while vm.running():
                    await asyncio.sleep(ADOPTED_POLL_S)
                status = 255  # not our child: its status is unknowable
            if self.vms.get(sid) is vm:
                await on_exit(sid, status)

        self.watchers[sid] = asyncio.create_task(watch(), name=f"vm-watch-{sid}")

    def pid(self, sid: str) -> int:
        vm = self.vms.get(sid)
        return int(vm.pid or 0) if vm is not None and vm.running() else 0

    def record(self, sid: str) -> dict[str, Any]:
        vm = self.vms.get(sid)
        return vm.record() if vm is not None else {}

    async def stop(self, sid: str) -> None:
        """Stop the VM (idempotent); its watcher is cancelled first so it reports no exit."""
        task = self.watchers.pop(sid, None)
        vm = self.vms.pop(sid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if vm is not None:
            await vm.stop()

    async def recover(self, sid: str, record: Mapping[str, Any],
                      on_exit: Callable[[str, int], Any]) -> bool:
        """Re-attach to a VM a previous sandboxer started; False when it is gone."""
        if not record:
            return False
        try:
            vm = await MicroVM.recover(dict(record), registry=self.registry, tracer=self.tracer)
        except (VMError, KeyError, TypeError, ValueError) as exc:
            log.warning("sandbox %s: VM not recovered: %s", sid, exc)
            return False
        self.vms[sid] = vm
        self._watch(sid, vm, on_exit)
        return True

    async def kill_strays(self, agent_socket: str) -> list[int]:
        """SIGKILL any QEMU serving `agent_socket` that no record points at (a Start cut
        short by a crash); returns their pids."""
        from bench.processes import find_processes
        strays = [p.pid for p in find_processes(names=[Path(self._qemu_binary()).name],
                                                 cmdline_contains=[agent_socket])]
        for pid in strays:
            log.warning("killing stray VMM %d of %s", pid, agent_socket)
            for kill in (os.killpg, os.kill):  # QEMU leads its own group (with any `cat`)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
        return strays

    def _qemu_binary(self) -> str:
        return self.config.qemu if self.config is not None else VMConfig.__dataclass_fields__[
            "qemu"].default

    async def close(self, stop_vms: bool) -> None:
        """Sandboxer exit: stop watching; with `stop_vms` also stop every VM."""
        for sid in list(self.watchers):
            task = self.watchers.pop(sid)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        vms, self.vms = list(self.vms.values()), {}
        for vm in vms:
            if stop_vms:
                await vm.stop()
                continue
            # Leave the VM running for the next sandboxer.  QMP serves one client: let go.
            if vm.qmp is not None:
                qmp, vm.qmp = vm.qmp, None
                with contextlib.suppress(Exception):
                    await qmp.close()
            # asyncio kills a still-running child when its transport is closed or collected;
            # marking the Popen as finished is the only way to let the VM live on.
            popen = getattr(getattr(vm.proc, "_transport", None), "_proc", None)
            if popen is not None and popen.returncode is None:
                popen.returncode = 0
            if vm.pid is not None:
                self.registry.unregister(vm.pid)
