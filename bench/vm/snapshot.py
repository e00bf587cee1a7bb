"""Owns: microVM template snapshots: making one, and reusing one made with the same config.

A template VM boots once, its agent is left idle with no host connected, and QMP `migrate`
(no `stop` first) writes its state to `DIR/vm.snap`; `DIR/snapshot.json` records the VMConfig
every clone must use (`MicroVM.restore(snapshot)`).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.processes import ProcessRegistry
from bench.vm.agent_port import waiting_line
from bench.vm.qemu import MicroVM, Snapshot, VMConfig, VMError


async def ensure_snapshot(directory: str | os.PathLike[str], config: VMConfig, *,
                          registry: ProcessRegistry | None = None) -> Snapshot:
    """The snapshot in `directory` when it was made with `config`, else a fresh one.

    Safe to call from many processes at once (per-pod shims): an flock on `directory/.lock`
    lets one of them make the snapshot while the others wait and then reuse it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.05)  # polling keeps the event loop free
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            snap = Snapshot.load(d)
            if snap.config == config and snap.path.is_file():
                return snap
        return await create_snapshot(d, config, registry=registry)
    finally:
        os.close(fd)  # releases the lock


async def create_snapshot(directory: str | os.PathLike[str], config: VMConfig, *,
                          registry: ProcessRegistry | None = None,
                          timeout: float = 180.0) -> Snapshot:
    """Boot a template VM, let its agent go idle, migrate it to `directory/vm.snap`."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    snap, tmp = d / "vm.snap", d / "vm.snap.tmp"
    # init_on_free: pages the template's guest frees (the initrd after unpacking, Python's
    # start-up garbage) are zeroed, so the stream does not carry them and clones do not load
    # them (-2 MB per clone).  It touches all guest RAM at boot, so only the template pays.
    # Clones boot no kernel, so the differing -append is not part of what they must match.
    tconfig = replace(config, extra_append=f"{config.extra_append} init_on_free=1".strip())
    vm = MicroVM("template", d / "template", tconfig, registry=registry)
    try:
        await vm.boot(timeout=timeout)
        # Readiness closed its connection; wait until the agent has seen that and gone idle,
        # so the frozen guest holds no half-open session.
        await vm.wait_serial(waiting_line(1), timeout=30)
        assert vm.qmp is not None
        await vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": 8 << 30})
        await vm.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(tmp))}"})
        deadline = time.monotonic() + timeout
        while True:
            st = await vm.qmp.execute("query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise VMError(f"template migration {status}: {st.get('error-desc', '')}")
            await asyncio.sleep(0.02)
    except BaseException:
        vm.failed = True
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        await vm.stop()
        if not vm.failed:
            shutil.rmtree(vm.workdir, ignore_errors=True)
    tmp.rename(snap)
    size = snap.stat().st_size
    (d / "snapshot.json").write_text(json.dumps({"config": asdict(config), "size": size}))
    return Snapshot(snap, config, size)
