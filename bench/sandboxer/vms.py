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

Pool (restore only): `pool_size` QEMUs (env CHAINBENCH_VM_POOL; default 0 = no pool, 2 suits a
sequential run, the concurrency a burst) are kept prespawned (`-incoming defer`, QMP up,
migration capabilities set: `MicroVM.prespawn`), so a Start only loads the snapshot and
resumes.  Pool mode `restored` (env CHAINBENCH_VM_POOL_MODE; Kata's "VM cache") goes further:
pooled VMs are restored and their agent warmed up ahead, so a Start is one Connect round trip;
its `vm.restore` span is then zero-length, and each idle pooled VM costs a restored VM's memory
and ~2% of a core.  Pool VMs live in `<pool dir>/<our pid>-<start ticks>/p<N>/` (env
CHAINBENCH_VM_POOL_DIR, default /run/chainbench/vmpool); a claimed one gets the sandbox's
`agent.sock` as a symlink to its socket (QEMU named its sockets at spawn) and a `claimed`
marker, and from then on is a sandbox VM like any other (it survives a sandboxer restart:
`recover()` finds it by its recorded work dir).  The pool is refilled after each Start returns,
at nice 10 so the upkeep does not slow the pod's next calls.  Unclaimed pool VMs are ours
alone: `close()` always stops them, the process registry kills them at interpreter exit, and
`prepare()` kills the unclaimed ones a dead sandboxer left behind.  They are the sandboxer's
children, so memory probes count them as VMM memory: a constant, not per pod (an idle
prespawned QEMU holds no guest RAM: ~20 MB PSS; see `python -m bench.vm.measure`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from bench.processes import ProcessRegistry, find_processes, process_start_ticks
from bench.tracing import Tracer
from bench.vm.qemu import MicroVM, Snapshot, VMConfig, VMError, disable_thp_here
from sim.vocabulary import CALL_RUN_POD

log = logging.getLogger("bench.sandboxer.vm")

BACKENDS = ("runc", "vm")
BOOT_MODES = ("restore", "cold")
ANNOTATION_BOOT = "io.chainbench.vm.boot"
ANNOTATION_BACKEND = "io.chainbench.sandbox.backend"
ADOPTED_POLL_S = 0.5  # an adopted QEMU is not our child: its exit is noticed by polling /proc
ENV_POOL = "CHAINBENCH_VM_POOL"
ENV_POOL_DIR = "CHAINBENCH_VM_POOL_DIR"
ENV_POOL_MODE = "CHAINBENCH_VM_POOL_MODE"
POOL_MODES = ("spawned", "restored")
# Off unless asked for: idle pooled QEMUs are VMM processes a run's memory samples include
# (a constant, not per pod), which a scenario should choose knowingly.
DEFAULT_POOL = 0
DEFAULT_POOL_DIR = "/run/chainbench/vmpool"
CLAIMED = "claimed"  # marker in a pool slot: a sandbox owns this VM now
POOL_READY = "ready"  # marker in a pool slot: prespawned (or restored), waiting in the pool
_POOL_RETRY_S = 5.0  # after a failed prespawn: do not hammer a broken QEMU/snapshot
# Pool upkeep runs right after a Start, beside that pod's next calls: at a low CPU priority
# it takes only what they leave.  A claimed VM gets the normal priority back.
POOL_NICE = 10


def pool_mode_from_env(env: Mapping[str, str] | None = None) -> str:
    mode = (os.environ if env is None else env).get(ENV_POOL_MODE) or POOL_MODES[0]
    if mode not in POOL_MODES:
        raise ValueError(f"{ENV_POOL_MODE}={mode!r}: want one of {POOL_MODES}")
    return mode


def pool_size_from_env(env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(ENV_POOL, "")
    if not raw:
        return DEFAULT_POOL
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_POOL}={raw!r}: want a whole number >= 0") from None
    if not 0 <= n <= 64:
        raise ValueError(f"{ENV_POOL}={raw!r}: want 0..64")
    return n


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
    pool_size: int | None = None  # None: env CHAINBENCH_VM_POOL, else DEFAULT_POOL
    pool_mode: str | None = None  # None: env CHAINBENCH_VM_POOL_MODE, else "spawned"
    pool_dir: Path | None = None  # None: env CHAINBENCH_VM_POOL_DIR, else DEFAULT_POOL_DIR
    # unclaimed pool VMs die with us (atexit), unlike sandbox VMs
    pool_registry: ProcessRegistry = field(default_factory=lambda: ProcessRegistry("vm-pool"))
    pool: list[MicroVM] = field(default_factory=list)
    _filling: set[asyncio.Task[None]] = field(default_factory=set)
    _pool_seq: int = 0
    _pool_retry_at: float = 0.0
    links: dict[str, Path] = field(default_factory=dict)  # sid -> its dir, for pooled VMs
    _closed: bool = False
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
        """At sandboxer start: resolve the guest config and, for restore, the snapshot and the
        pool (after killing unclaimed pool VMs of dead sandboxers)."""
        self._config()
        if self.pool_size is None:
            self.pool_size = pool_size_from_env()
        if self.pool_mode is None:
            self.pool_mode = pool_mode_from_env()
        if self.pool_dir is None:
            self.pool_dir = Path(os.environ.get(ENV_POOL_DIR) or DEFAULT_POOL_DIR).resolve()
        await asyncio.to_thread(self._sweep_pool)
        if self.boot == "restore":
            await self._ensure_snapshot()
            self._refill()

    # -- pool ---------------------------------------------------------------------------------
    def _owner_dir(self) -> Path:
        assert self.pool_dir is not None
        pid = os.getpid()
        return self.pool_dir / f"{pid}-{process_start_ticks(pid)}"

    def _sweep_pool(self) -> None:
        """Kill the unclaimed pool VMs of sandboxers that are gone and remove their slots;
        claimed ones belong to sandboxes (recovered or swept by `kill_strays`)."""
        root = self.pool_dir
        if root is None or not root.is_dir():
            return
        mine = self._owner_dir().name
        for owner in root.iterdir():
            pid_s, _, ticks_s = owner.name.partition("-")
            if owner.name == mine or not pid_s.isdigit():
                continue
            if ticks_s.isdigit() and process_start_ticks(int(pid_s)) == int(ticks_s):
                continue  # another live sandboxer's pool
            for slot in owner.iterdir() if owner.is_dir() else ():
                if (slot / CLAIMED).exists():
                    continue
                for p in find_processes(names=[Path(self._qemu_binary()).name],
                                        cmdline_contains=[f"{slot}/"]):
                    log.warning("killing unclaimed pool VMM %d of a dead sandboxer", p.pid)
                    for kill in (os.killpg, os.kill):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            kill(p.pid, signal.SIGKILL)
                shutil.rmtree(slot, ignore_errors=True)
            with contextlib.suppress(OSError):
                owner.rmdir()  # only once no claimed slot is left

    def _refill(self) -> None:
        """Start prespawns in the background until the pool is full (never blocks a Start)."""
        want = (self.pool_size or 0) - len(self.pool) - len(self._filling)
        if self._closed or want <= 0 or self.snapshot is None or \
                asyncio.get_running_loop().time() < self._pool_retry_at:
            return
        for _ in range(want):
            task = asyncio.create_task(self._prespawn_one(self.snapshot))
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _prespawn_one(self, snap: Snapshot) -> None:
        self._pool_seq += 1
        vm = MicroVM(f"pool-{self._pool_seq}", self._owner_dir() / f"p{self._pool_seq}",
                     self._config(), registry=self.pool_registry)
        vm.nice = POOL_NICE
        try:
            await vm.prespawn(snap)
            if self.pool_mode == "restored":
                await vm.restore(snap)
                # a second request warms the agent's request path (TCG translates guest code
                # on first use: the first answers after a restore cost ~10x the later ones)
                await vm.check_ready()
        except asyncio.CancelledError:
            await self._discard(vm)
            raise
        except Exception as exc:  # a Start without a pooled VM still works: just slower
            log.warning("prespawning a pool VM failed: %s", exc)
            self._pool_retry_at = asyncio.get_running_loop().time() + _POOL_RETRY_S
            await self._discard(vm)
            return
        if self._closed:
            await self._discard(vm)
            return
        (vm.workdir / POOL_READY).touch()  # for an outside observer (tests, an operator)
        self.pool.append(vm)

    async def _discard(self, vm: MicroVM) -> None:
        await vm.stop()
        shutil.rmtree(vm.workdir, ignore_errors=True)

    async def _take(self, snap: Snapshot, sid: str, workdir: Path) -> MicroVM | None:
        """A pooled VM made ready for sandbox `sid`, or None (pool empty)."""
        while self.pool:
            vm = self.pool.pop(0)
            warm = vm.running() and vm.restored_from is snap
            if not warm and vm.prespawned_for is not snap:
                await self._discard(vm)  # died, or made for a snapshot since replaced
                continue
            vm.claim(sid, tracer=self.tracer, pod=sid, call=CALL_RUN_POD)
            vm.renice(0)
            link = workdir / "agent.sock"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            # the address handed out names the sandbox's dir; QEMU's socket is in the slot
            link.symlink_to(vm.socket_path)
            (vm.workdir / CLAIMED).write_text(str(workdir))
            with contextlib.suppress(FileNotFoundError):
                (vm.workdir / POOL_READY).unlink()
            self.links[sid] = workdir
            pid = vm.pid
            assert pid is not None
            self.pool_registry.unregister(pid)
            vm.registry = self.registry
            self.registry.register(pid, "vmm", sid, group=True)
            return vm
        return None

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
        if boot == "restore":
            snap = await self._ensure_snapshot()
            vm = await self._take(snap, sid, workdir)
            if vm is None:
                vm = MicroVM(sid, workdir, self._config(), registry=self.registry,
                             tracer=self.tracer, pod=sid, call=CALL_RUN_POD)
            try:
                if vm.restored_from is snap:
                    await vm.check_ready()  # a warm pool's VM: restored already
                else:
                    await vm.restore(snap)
            except BaseException:
                self.links.pop(sid, None)
                self._forget_slot(vm, workdir)
                raise
            finally:
                self._refill()
        else:
            vm = MicroVM(sid, workdir, self._config(), registry=self.registry,
                         tracer=self.tracer, pod=sid, call=CALL_RUN_POD)
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
            self._forget_slot(vm, self.links.pop(sid, vm.workdir))

    def _in_pool(self, path: Path) -> bool:
        return self.pool_dir is not None and path.is_relative_to(self.pool_dir)

    def _forget_slot(self, vm: MicroVM, workdir: Path) -> None:
        """After a pooled VM stopped: its slot dir (kept when it failed: QEMU's logs) and
        the sandbox's symlink to its socket."""
        if not self._in_pool(vm.workdir):
            return
        # (a failed VM's logs are in the error it raised already)
        shutil.rmtree(vm.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            vm.workdir.parent.rmdir()  # its owner's dir, once empty (also a dead owner's)
        link = workdir / "agent.sock"
        if link.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                link.unlink()

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
        # A pooled VM was spawned with its slot's socket; the sandbox's is a symlink to it.
        sockets = {agent_socket, os.path.realpath(agent_socket)}
        strays = sorted({p.pid for sock in sockets
                         for p in find_processes(names=[Path(self._qemu_binary()).name],
                                                 cmdline_contains=[sock])})
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
        """Sandboxer exit: stop the pool and watching; with `stop_vms` also stop every VM."""
        self._closed = True
        filling = list(self._filling)
        for task in filling:
            task.cancel()
        await asyncio.gather(*filling, return_exceptions=True)
        pool, self.pool = self.pool, []
        await asyncio.gather(*(self._discard(vm) for vm in pool), return_exceptions=True)
        for sid in list(self.watchers):
            task = self.watchers.pop(sid)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        vms, self.vms = list(self.vms.items()), {}
        for sid, vm in vms:
            if stop_vms:
                await vm.stop()
                self._forget_slot(vm, self.links.pop(sid, vm.workdir))
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
        if self.pool_dir is not None:
            with contextlib.suppress(OSError):
                self._owner_dir().rmdir()  # kept while claimed VMs live on in it
            with contextlib.suppress(OSError):
                self.pool_dir.rmdir()
