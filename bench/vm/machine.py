"""Owns: the microVM's machine definition — VMConfig and the QEMU command line it yields, the
host facts it needs (TSC rate, THP), and the Snapshot record a clone must match.

bench.vm.qemu re-exports all of it; MicroVM (there) runs these machines.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.doctor import accel_mode

_PR_SET_THP_DISABLE = 41
_PR_GET_THP_DISABLE = 42


def _no_thp() -> None:
    """preexec_fn: no transparent huge pages for the VMM (inherited across exec)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


def disable_thp_here() -> None:
    """Turn THP off for this process, so the VMMs it spawns inherit that without a preexec_fn.

    A preexec_fn runs Python in the forked child; in a process with other threads (a gRPC
    server: the sandboxer) that child can crash before exec (seen: QEMU "exited" with -11)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


def _thp_disabled_here() -> bool:
    import ctypes
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1


class VMError(RuntimeError):
    pass


def host_tsc_khz() -> int:
    """The host TSC rate; without it as `tsc_early_khz` a TCG guest often hangs calibrating.

    It is part of VMConfig, so it must be stable (a snapshot matches only an equal config):
    dmesg's boot-time figure, remembered per host boot in the cache (dmesg costs ~10 ms and may
    have rotated out); /proc/cpuinfo's current "cpu MHz" only as a last resort."""
    cache = Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench")) / "tsc_khz.json"
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(cache.read_text())
        if boot_id and known["boot_id"] == boot_id:
            return int(known["khz"])
    khz = 0
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"tsc: Detected ([0-9.]+) MHz", out)
        if m:
            khz = int(float(m.group(1)) * 1000)
    if not khz:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    khz = int(float(line.split(":")[1]) * 1000)
                    break
    if not khz:
        raise VMError("cannot determine the host TSC frequency")
    if boot_id:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"boot_id": boot_id, "khz": khz}))
            tmp.rename(cache)
    return khz


@dataclass(frozen=True)
class VMConfig:
    """Everything that shapes the guest; a snapshot is only valid for the identical config."""

    kernel: str
    initrd: str
    memory_mb: int = 128
    cpus: int = 1
    accel: str = "tcg"
    tsc_khz: int = 0
    qemu: str = "qemu-system-x86_64"
    extra_append: str = ""
    # QEMU madvises guest RAM for transparent huge pages; a clone that writes a few KiB of a
    # 2 MiB region then owns all of it.  False = spawn QEMU with PR_SET_THP_DISABLE.
    huge_pages: bool = False

    @classmethod
    def default(cls, *, build: bool = True, **overrides: Any) -> "VMConfig":
        """Our tiny kernel + agent initramfs (built and cached when `build`), accel per host."""
        from bench.vm import initramfs, kernel
        kinfo = kernel.build(quiet=True) if build else kernel.find_kernel()
        iinfo = initramfs.build() if build else initramfs.find_initramfs()
        if kinfo is None or iinfo is None:
            raise VMError("guest kernel or initramfs not built: python -m bench.vm.kernel; "
                          "python -m bench.vm.initramfs")
        kw: dict[str, Any] = {"kernel": str(kinfo.path), "initrd": str(iinfo.path),
                              "accel": accel_mode(), "tsc_khz": host_tsc_khz()}
        if kinfo.boot_args:  # the stock kernel's; our tiny kernel has its own built in
            kw["extra_append"] = kinfo.boot_args
        if kinfo.boot_args and overrides.get("extra_append"):
            overrides = {**overrides,
                         "extra_append": f"{kinfo.boot_args} {overrides['extra_append']}"}
        kw.update(overrides)
        return cls(**kw)

    def append(self) -> str:
        # panic=-1 + reboot=t with -no-reboot: a dying guest ends QEMU instead of hanging.
        args = f"console=ttyS0 quiet tsc_early_khz={self.tsc_khz} tsc=reliable no_timer_check " \
               "panic=-1 reboot=t"
        return f"{args} {self.extra_append}".strip()

    def argv(self, *, socket_path: str, qmp_path: str, serial_log: str,
             incoming: str | None = None, ram_file: str | None = None,
             ram_shared: bool = False) -> list[str]:
        """`ram_file`: guest RAM is that file, mapped shared (a template writes its RAM there)
        or private (a clone reads it copy-on-write and never writes the file)."""
        machine = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on"
        if ram_file:
            machine += ",memory-backend=ram0"
        argv = [self.qemu, "-M", machine, "-accel", self.accel,
                "-smp", str(self.cpus), "-m", f"{self.memory_mb}M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{serial_log}",
                # port 0 is reserved for a console; fewer ports = fewer guest virtqueues (~2 MB)
                "-device", "virtio-serial-device,max_ports=2",
                "-chardev", f"socket,id=c0,path={socket_path},server=on,wait=off",
                "-device", "virtserialport,chardev=c0,name=agent",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if self.accel == "kvm":
            argv[argv.index("-smp"):argv.index("-smp")] = ["-cpu", "host"]
        if ram_file:
            if "," in ram_file:
                raise VMError(f"RAM file path {ram_file!r} must not contain a comma")
            argv += ["-object", f"memory-backend-file,id=ram0,size={self.memory_mb}M,"
                     f"mem-path={ram_file},share={'on' if ram_shared else 'off'}"]
        if incoming:
            # A clone needs no kernel: its RAM comes from the stream, and fw_cfg (where QEMU
            # would keep a 10 MB copy of vmlinux + initrd per process) is only read at boot.
            argv += ["-incoming", incoming]
        else:
            argv += ["-kernel", self.kernel, "-initrd", self.initrd, "-append", self.append()]
        return argv


@dataclass(frozen=True)
class Snapshot:
    """A template VM's migration stream plus the config every clone must boot with.

    `ram` set: the template's RAM is that file and the stream holds device state only
    (migration capability x-ignore-shared); clones map the file privately, so its pages are
    shared through the page cache instead of copied into each clone.  `ram` None: the RAM is
    in the stream.  `identity`: the QEMU binary, kernel and initrd the snapshot was made with
    (bench.vm.snapshot.identity), checked before reuse."""

    path: Path
    config: VMConfig
    size: int
    ram: Path | None = None
    identity: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Snapshot":
        d = Path(directory)
        meta = json.loads((d / "snapshot.json").read_text())
        ram = meta.get("ram")
        return cls(d / "vm.snap", VMConfig(**meta["config"]), meta["size"],
                   d / ram if ram else None,
                   tuple((str(k), str(v)) for k, v in sorted(meta.get("identity", {}).items())))

    def files_present(self) -> bool:
        return self.path.is_file() and (self.ram is None or self.ram.is_file())
