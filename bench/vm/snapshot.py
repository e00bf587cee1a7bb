"""Owns: microVM template snapshots: making one, their identity, and reusing one made with the
same config, QEMU binary, kernel and initrd.

A template VM boots once, its agent is left idle with no host connected, and QMP `migrate`
(no `stop` first) writes its state to `DIR/vm.snap`; `DIR/snapshot.json` records the VMConfig
every clone must use (`MicroVM.restore(snapshot)`) and the identity of what it was made with.

Two kinds (`ram=`):
* "file" (default; the VM-templating recipe Kata uses): the template's RAM is the file
  `DIR/ram` mapped shared, and with the migration capability x-ignore-shared the stream holds
  device state only (~50 KB).  Clones map `DIR/ram` privately (copy-on-write): nothing is
  copied at restore, pages fault in from the page cache on first touch, and pages a clone never
  writes stay shared between all clones (lower PSS per VM).  No clone can write the file.
* "stream": the RAM travels in `vm.snap` (~40 MB) and each clone loads a full private copy.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.processes import ProcessRegistry
from bench.vm.agent_port import waiting_line
from bench.vm.qemu import MicroVM, Snapshot, VMConfig, VMError

RAM_KINDS = ("file", "stream")
DEFAULT_RAM = "file"
_RAM_FILE = "ram"


def _file_id(path: str) -> str:
    """Changes whenever the file is replaced or rewritten (package upgrade, rebuild)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def qemu_binary(config: VMConfig) -> str:
    found = shutil.which(config.qemu)
    if not found:
        raise VMError(f"QEMU binary {config.qemu!r} not found")
    return found


def qemu_version(binary: str) -> str:
    """`qemu --version`'s first line, cached by the binary's identity (it costs ~20 ms, and a
    per-pod shim asks on every restore)."""
    fid = _file_id(binary)
    cache = Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench")) / "qemu-version.json"
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        known = json.loads(cache.read_text())
        if isinstance(known.get(fid), str):
            return known[fid]
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise VMError(f"{binary} --version: {exc}") from None
    version = out.splitlines()[0].strip() if out.strip() else "unknown"
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({fid: version}))
        tmp.rename(cache)
    return version


def identity(config: VMConfig) -> dict[str, str]:
    """What a snapshot depends on beyond VMConfig's fields: the QEMU binary (a new QEMU may
    not load an old stream, or load it wrongly) and the kernel and initrd files (rebuilt at the
    same path, they change the guest a template would have booted)."""
    try:
        binary = qemu_binary(config)
        return {"qemu": _file_id(binary), "qemu_version": qemu_version(binary),
                "kernel": _file_id(config.kernel), "initrd": _file_id(config.initrd)}
    except OSError as exc:
        raise VMError(f"snapshot identity: {exc}") from None


def identity_digest(config: VMConfig) -> str:
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()


def usable(snap: Snapshot | None, config: VMConfig, ram: str | None = None) -> bool:
    """`snap` was made for `config` by the QEMU, kernel and initrd in place now (and is of
    kind `ram`, when given), and its files are there."""
    if snap is None or snap.config != config or not snap.files_present():
        return False
    if ram is not None and (snap.ram is not None) != (ram == "file"):
        return False
    try:
        return dict(snap.identity) == identity(config)
    except VMError:
        return False


def load(directory: str | os.PathLike[str], config: VMConfig,
         ram: str | None = None) -> Snapshot | None:
    try:
        snap = Snapshot.load(directory)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return snap if usable(snap, config, ram) else None


async def ensure_snapshot(directory: str | os.PathLike[str], config: VMConfig, *,
                          registry: ProcessRegistry | None = None,
                          ram: str = DEFAULT_RAM) -> Snapshot:
    """The snapshot in `directory` when it is usable for `config`, else a fresh one.

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
        snap = load(d, config, ram)
        if snap is not None:
            return snap
        return await create_snapshot(d, config, registry=registry, ram=ram)
    finally:
        os.close(fd)  # releases the lock


async def create_snapshot(directory: str | os.PathLike[str], config: VMConfig, *,
                          registry: ProcessRegistry | None = None,
                          timeout: float = 180.0, ram: str = DEFAULT_RAM) -> Snapshot:
    """Boot a template VM, let its agent go idle, migrate it to `directory/vm.snap` (and, for
    `ram="file"`, leave its RAM in `directory/ram`)."""
    if ram not in RAM_KINDS:
        raise ValueError(f"ram={ram!r}: want one of {RAM_KINDS}")
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    ident = identity(config)
    snap, tmp = d / "vm.snap", d / "vm.snap.tmp"
    ram_path = d / _RAM_FILE if ram == "file" else None
    # A new RAM file under a fresh name: clones of an older snapshot may still map `ram`, and
    # the template must not write into their pages.  It replaces `ram` once complete.
    ram_tmp = d / f"{_RAM_FILE}.{os.getpid()}.tmp" if ram_path else None
    meta = d / "snapshot.json"
    with contextlib.suppress(FileNotFoundError):
        meta.unlink()  # from here until the end, the directory holds no usable snapshot
    # init_on_free: pages the template's guest frees (the initrd after unpacking, Python's
    # start-up garbage) are zeroed, so the stream does not carry them and clones do not load
    # them (-2 MB per clone).  It touches all guest RAM at boot, so only the template pays.
    # Clones boot no kernel, so the differing -append is not part of what they must match.
    tconfig = replace(config, extra_append=f"{config.extra_append} init_on_free=1".strip())
    vm = MicroVM("template", d / "template", tconfig, registry=registry)
    if ram_tmp is not None:
        vm.ram_file = str(ram_tmp)
    try:
        await vm.boot(timeout=timeout)
        # Readiness closed its connection; wait until the agent has seen that and gone idle,
        # so the frozen guest holds no half-open session.
        await vm.wait_serial(waiting_line(1), timeout=30)
        assert vm.qmp is not None
        if ram_tmp is not None:
            await vm.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})
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
        for p in (tmp, ram_tmp):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        raise
    finally:
        # The template is paused since the migration completed: its RAM file is final.
        await vm.stop()
        if not vm.failed:
            shutil.rmtree(vm.workdir, ignore_errors=True)
    if ram_tmp is not None and ram_path is not None:
        await asyncio.to_thread(_fsync, ram_tmp)
        ram_tmp.rename(ram_path)
    elif ram_path is None:
        with contextlib.suppress(FileNotFoundError):
            (d / _RAM_FILE).unlink()
    await asyncio.to_thread(_fsync, tmp)
    tmp.rename(snap)
    size = snap.stat().st_size
    out = Snapshot(snap, config, size, ram_path, tuple(sorted(ident.items())))
    body = {"config": asdict(config), "size": size, "identity": ident,
            "ram": _RAM_FILE if ram_path else None}
    mtmp = meta.with_suffix(f".{os.getpid()}.tmp")
    mtmp.write_text(json.dumps(body))
    mtmp.rename(meta)
    return out


def _fsync(path: Path) -> None:
    """The snapshot outlives this boot of the host: its files must be whole before
    snapshot.json says they are usable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
