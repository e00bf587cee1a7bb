"""Owns: the VM side of the shim behind a small interface — which backend and boot mode a pod
gets, launching its VM, watching it die, stopping it — plus the two backends: `host` (the guest
agent run as a plain host process on a unix socket: real processes, no VMM; for tests and for
measuring the shim alone) and `qemu` (bench.vm.qemu's microVM driver, cold boot or template
snapshot restore).

Choice per pod, first match wins:
  1. annotations in `<bundle>/config.json`: `io.chainbench.vm.backend`, `io.chainbench.vm.boot`;
  2. `<bundle>/vm.json`: {"backend": "...", "boot": "...", "agent_timeout_s": N, ...};
  3. env CHAINBENCH_VM_BACKEND / CHAINBENCH_VM_BOOT (inherited from the engine);
  4. defaults: qemu, restore.
Any other key of vm.json goes to the backend untouched (`VmOptions.extra`).

A backend's `launch` returns either once the VMM runs (`ready = False`: the shim then dials
`agent_address`, times that as `agent.ready` and records the launch as `vm.boot`/`vm.restore`),
or once the agent has answered (`ready = True`: the backend recorded both spans itself, with the
VMM/guest split only it can see — QEMU's "running" state).
"""
from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench.tracing import Tracer

log = logging.getLogger("chainbench.vmshim.vm")

BACKENDS = ("qemu", "host")
BOOT_MODES = ("restore", "cold")
ANNOTATION_BACKEND = "io.chainbench.vm.backend"
ANNOTATION_BOOT = "io.chainbench.vm.boot"
CONFIG_FILE = "vm.json"
ENV_BACKEND = "CHAINBENCH_VM_BACKEND"
ENV_BOOT = "CHAINBENCH_VM_BOOT"
DEFAULT_AGENT_TIMEOUT_S = 60.0  # a cold boot under TCG plus the guest's Python start


class VmConfigError(ValueError):
    """The pod asked for a backend/boot mode that does not exist (-> INVALID_ARGUMENT)."""


class VmError(RuntimeError):
    """The VM could not be launched or its agent never answered (-> UNAVAILABLE/INTERNAL)."""


@dataclass
class VmOptions:
    backend: str = "qemu"
    boot: str = "restore"
    agent_timeout_s: float = DEFAULT_AGENT_TIMEOUT_S
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_options(bundle: str | os.PathLike[str],
                    env: Mapping[str, str] | None = None) -> VmOptions:
    env = os.environ if env is None else env
    b = Path(bundle)
    opts = VmOptions()
    file_cfg: dict[str, Any] = {}
    p = b / CONFIG_FILE
    if p.exists():
        try:
            file_cfg = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise VmConfigError(f"{p}: {exc}") from None
        if not isinstance(file_cfg, dict):
            raise VmConfigError(f"{p}: want a JSON object")
    annotations: dict[str, Any] = {}
    try:
        spec = json.loads((b / "config.json").read_text())
        annotations = spec.get("annotations") if isinstance(spec, dict) else None
    except (OSError, ValueError):
        pass  # the bundle's spec is the engine's business; no annotations then
    if not isinstance(annotations, dict):
        annotations = {}

    def pick(annotation: str, key: str, env_key: str, default: str) -> str:
        for value in (annotations.get(annotation), file_cfg.get(key), env.get(env_key)):
            if value:
                return str(value)
        return default

    opts.backend = pick(ANNOTATION_BACKEND, "backend", ENV_BACKEND, opts.backend)
    opts.boot = pick(ANNOTATION_BOOT, "boot", ENV_BOOT, opts.boot)
    if opts.backend not in BACKENDS:
        raise VmConfigError(f"unknown VM backend {opts.backend!r}; want one of {BACKENDS}")
    if opts.boot not in BOOT_MODES:
        raise VmConfigError(f"unknown VM boot mode {opts.boot!r}; want one of {BOOT_MODES}")
    t = file_cfg.get("agent_timeout_s", opts.agent_timeout_s)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise VmConfigError(f"{p}: agent_timeout_s must be a positive number")
    opts.agent_timeout_s = float(t)
    opts.extra = {k: v for k, v in file_cfg.items()
                  if k not in ("backend", "boot", "agent_timeout_s")}
    return opts


class VmHandle(abc.ABC):
    """One running VM (or stand-in).  `pid`/`pgid` and `stop_mode` let an outsider (the
    shim's `delete` action) stop it from the state file after the shim died."""

    pid: int = 0
    pgid: int | None = None
    stop_mode: str = "kill"  # "kill": SIGKILL is safe; "term": SIGTERM first, then SIGKILL
    agent_address: str = ""  # ttrpc address of the guest agent, as the host reaches it
    step: str = "vm.boot"  # the span this launch is recorded as: vm.boot | vm.restore
    accel: str = ""  # kvm | tcg | "" (host backend)
    ready: bool = False  # the agent has answered already and the spans are recorded

    @abc.abstractmethod
    async def wait(self) -> int:
        """Until the VM is gone; its exit status (as the VMM process reports it)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Tear the VM down and wait for it to be gone; idempotent."""

    def describe(self) -> dict[str, Any]:
        from bench.vmshim.launch import start_ticks
        return {"pid": self.pid, "ticks": start_ticks(self.pid), "pgid": self.pgid,
                "stop": self.stop_mode, "agent": self.agent_address, "accel": self.accel}


class VmBackend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    async def launch(self, vm_id: str, workdir: Path, opts: VmOptions, tracer: Tracer,
                     call: str) -> VmHandle:
        """Start the VM for pod `vm_id`; sockets go below `workdir` (exists, empty).
        `tracer`/`call` are for backends that record their own spans (pod = vm_id)."""


# -- host backend -------------------------------------------------------------------------------
class _ProcessVm(VmHandle):
    """A VM whose whole life is one child process of the shim."""

    def __init__(self, proc: asyncio.subprocess.Process, agent_address: str, *,
                 stop_mode: str, step: str, accel: str = "") -> None:
        self.proc = proc
        self.pid = proc.pid
        self.agent_address = agent_address
        self.stop_mode = stop_mode
        self.step = step
        self.accel = accel
        self._stopping: asyncio.Task[None] | None = None

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        if self.proc.returncode is not None:
            return
        if self.stop_mode == "term":
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 2.0)
                return
            except asyncio.TimeoutError:
                log.warning("VM pid %d ignored SIGTERM; killing it", self.pid)
        self._signal(signal.SIGKILL)
        await self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass


class HostAgentBackend(VmBackend):
    """`python -m bench.vm.agent --listen <workdir>/agent.sock` as the "VM": what the shim does
    around a VM (launch, agent dial, relay, death, teardown) with the real agent, minus QEMU.
    SIGTERM lets the agent kill the processes it started (they run in their own sessions)."""

    name = "host"

    async def launch(self, vm_id: str, workdir: Path, opts: VmOptions, tracer: Tracer,
                     call: str) -> VmHandle:
        sock = workdir / "agent.sock"
        argv = [sys.executable, "-m", "bench.vm.agent", "--listen", str(sock)]
        try:
            # Its own session, like a daemonized VMM: a SIGKILL to the shim's group must not
            # SIGKILL the agent, or the processes it started would be orphaned; whoever
            # cleans up a dead shim runs its `delete` action, which stops the agent gracefully.
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                cwd=str(workdir), start_new_session=True)
        except OSError as exc:
            raise VmError(f"cannot start the host agent: {exc}") from None
        vm = _ProcessVm(proc, f"unix://{sock}", stop_mode="term", step="vm.boot")
        vm.pgid = proc.pid
        return vm


# -- QEMU backend -------------------------------------------------------------------------------
class QemuBackend(VmBackend):
    """bench.vm.qemu's microVM driver (owned by helper-vm); imported on first use so the shim
    runs with the host backend even where that module is absent."""

    name = "qemu"

    async def launch(self, vm_id: str, workdir: Path, opts: VmOptions, tracer: Tracer,
                     call: str) -> VmHandle:
        try:
            from bench.vmshim import qemu_adapter
        except ImportError as exc:
            raise VmError(f"the qemu VM backend is not available: {exc}") from None
        return await qemu_adapter.launch(vm_id, workdir, opts, tracer, call)


def backend(name: str) -> VmBackend:
    if name == "host":
        return HostAgentBackend()
    if name == "qemu":
        return QemuBackend()
    raise VmConfigError(f"unknown VM backend {name!r}; want one of {BACKENDS}")
