"""Owns: plugging bench.vm.qemu's MicroVM into the shim's VM interface — guest config per pod,
the cached template snapshot restores start from, and the handle the shim watches and stops.

Never builds the guest kernel inside a Create (minutes): the kernel and initramfs must be in the
cache already (`python -m bench.vm.kernel`, `python -m bench.vm.initramfs`).  The template
snapshot is made on first use and cached by config under
`$CHAINBENCH_CACHE/vmshim-snapshots/<hash>/` (a file lock keeps concurrent shims from making
it twice); `prepare_snapshot()` makes it ahead of a run so no pod pays for it.

vm.json keys understood here: memory_mb, cpus, snapshot_dir (use that snapshot instead of the
cache), boot_timeout_s.  Env CHAINBENCH_VM_SNAPSHOT_RAM picks the snapshot kind (bench.vm.snapshot:
`file`, the default: RAM in a file clones map copy-on-write; `stream`: RAM in the stream).
The cache key covers the config, the command line, the kind, and the QEMU binary (version),
kernel and initrd files (bench.vm.snapshot.identity), so an upgrade never loads a stale snapshot.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from bench.tracing import Tracer
from bench.vm import snapshot
from bench.vm.qemu import MicroVM, Snapshot, VMConfig, VMError
from bench.vmshim.vm import VmConfigError, VmError, VmHandle, VmOptions

_CONFIG_KEYS = {"memory_mb": int, "cpus": int}
ENV_RAM = "CHAINBENCH_VM_SNAPSHOT_RAM"


def vm_config(opts: VmOptions | None = None) -> VMConfig:
    overrides: dict[str, Any] = {}
    for key, typ in _CONFIG_KEYS.items():
        if opts is not None and key in opts.extra:
            value = opts.extra[key]
            if isinstance(value, bool) or not isinstance(value, typ) or value <= 0:
                raise VmConfigError(f"vm.json: {key} must be a positive {typ.__name__}")
            overrides[key] = value
    try:
        return VMConfig.default(build=False, **overrides)
    except VMError as exc:
        raise VmError(str(exc)) from None


def _cache_root() -> Path:
    return Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench")) / "vmshim-snapshots"


def snapshot_dir(config: VMConfig, ram: str = snapshot.DEFAULT_RAM) -> Path:
    # The config and the command line it yields: a snapshot only loads into the same machine
    # (devices included), and the driver may change the line without changing the config;
    # plus the QEMU binary (version), kernel and initrd files, and the snapshot kind.
    argv = config.argv(socket_path="S", qmp_path="Q", serial_log="L",
                       ram_file="R" if ram == "file" else None)
    blob = json.dumps([asdict(config), argv, snapshot.identity(config), ram],
                      sort_keys=True).encode()
    return _cache_root() / hashlib.sha256(blob).hexdigest()[:16]


def _load(d: Path, config: VMConfig, ram: str | None) -> Snapshot | None:
    return snapshot.load(d, config, ram)


def ram_kind(env: Mapping[str, str] | None = None) -> str:
    """Snapshot kind from env CHAINBENCH_VM_SNAPSHOT_RAM (file | stream; default file)."""
    kind = (os.environ if env is None else env).get(ENV_RAM) or snapshot.DEFAULT_RAM
    if kind not in snapshot.RAM_KINDS:
        raise VmConfigError(f"{ENV_RAM}={kind!r}: want one of {snapshot.RAM_KINDS}")
    return kind


async def ensure_snapshot(config: VMConfig, directory: Path | None = None) -> Snapshot:
    ram = ram_kind()
    try:
        d = directory or snapshot_dir(config, ram)
    except VMError as exc:
        raise VmError(str(exc)) from None
    snap = _load(d, config, None if directory else ram)
    if snap is not None:
        return snap
    if directory is not None:
        raise VmError(f"no usable snapshot for this VM config in {d}")
    d.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(d.parent / f"{d.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
        snap = _load(d, config, ram)  # another shim may have made it while we waited
        if snap is None:
            try:
                snap = await snapshot.create_snapshot(d, config, ram=ram)
            except VMError as exc:
                raise VmError(f"template snapshot: {exc}") from None
        return snap
    finally:
        os.close(lock_fd)  # releases the lock


def prepare_snapshot(memory_mb: int | None = None) -> Path:
    """Make (or find) the cached template snapshot for the default guest; returns its dir."""
    opts = VmOptions(extra={"memory_mb": memory_mb} if memory_mb else {})
    cfg = vm_config(opts)
    return asyncio.run(ensure_snapshot(cfg)).path.parent


class QemuVm(VmHandle):
    stop_mode = "kill"  # the guest dies with QEMU: nothing can be orphaned
    ready = True  # MicroVM waits for the agent's Connect and records both spans itself

    def __init__(self, vm: MicroVM, step: str) -> None:
        assert vm.proc is not None
        self.vm = vm
        self._proc = vm.proc
        self.pid = vm.proc.pid
        self.pgid = vm.proc.pid  # spawned in its own session by the process registry
        self.agent_address = vm.address
        self.step = step
        self.accel = vm.accel

    async def wait(self) -> int:
        return await self._proc.wait()

    async def stop(self) -> None:
        await self.vm.stop()


async def _snapshot_for(config: VMConfig, opts: VmOptions) -> Snapshot:
    snap_dir = opts.extra.get("snapshot_dir")
    return await ensure_snapshot(config, Path(snap_dir) if snap_dir else None)


async def launch(vm_id: str, workdir: Path, opts: VmOptions, tracer: Tracer,
                 call: str) -> VmHandle:
    config = vm_config(opts)
    timeout = opts.extra.get("boot_timeout_s", opts.agent_timeout_s)
    try:
        vm = MicroVM(vm_id, workdir, config, tracer=tracer, pod=vm_id, call=call)
    except ValueError as exc:
        raise VmError(str(exc)) from None
    try:
        if opts.boot == "restore":
            snap = await _snapshot_for(config, opts)
            await vm.restore(snap, timeout=timeout)
            return QemuVm(vm, "vm.restore")
        await vm.boot(timeout=timeout)
        return QemuVm(vm, "vm.boot")
    except VMError as exc:
        raise VmError(str(exc)) from None


def main() -> int:
    d = prepare_snapshot()
    print(d)
    return 0 if d else 1


if __name__ == "__main__":
    raise SystemExit(main())
