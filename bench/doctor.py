"""Owns: the prerequisite check (`chainbench doctor [--json]`).

Each check says what it found, what is missing and the command that installs it; the exit code is
0 only when every required check passes, so set-up scripts and CI can gate on it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

APT = "apt-get install -y"


@dataclass
class Check:
    name: str
    ok: bool
    found: str
    fix: str
    required: bool = True


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"error: {exc}"
    text = out.stdout + out.stderr
    m = re.search(pattern, text)
    if m:
        return m.group(1)
    lines = text.strip().splitlines()
    return lines[0] if lines else "unknown"


def tool_versions() -> dict[str, str]:
    """Versions of the real peers, recorded in every run's host facts."""
    vers: dict[str, str] = {"python": sys.version.split()[0]}
    if shutil.which("runc"):
        vers["runc"] = _version(["runc", "--version"], r"runc version (\S+)")
    if shutil.which("containerd"):
        vers["containerd"] = _version(["containerd", "--version"], r"containerd \S+ (\S+)")
    if shutil.which("qemu-system-x86_64"):
        vers["qemu"] = _version(["qemu-system-x86_64", "--version"], r"version (\S+)")
    guest = guest_kernel_label()
    if guest:
        vers["guest_kernel"] = guest
    return vers


def guest_kernel_label() -> str:
    """`tiny:<config hash>` or `stock:<release>` for the kernel microVMs boot, "" if none yet.

    Recorded with the tool versions in every run's host facts: a stock-kernel run boots ~1 s
    slower under TCG and must not be compared with a tiny-kernel one unawares."""
    from bench.vm import kernel
    try:
        info = kernel.find_kernel()
    except (kernel.KernelBuildError, OSError):
        return ""
    return info.label if info else ""


def accel_mode() -> str:
    """kvm only with a real vendor module: /dev/kvm here may be KVM-PVM, which runs no stock guest."""
    for mod in ("kvm_intel", "kvm_amd"):
        if Path("/sys/module", mod).exists() and os.path.exists("/dev/kvm"):
            return "kvm"
    return "tcg"


def _binary(name: str, package: str, version_cmd: list[str] | None = None,
            pattern: str = r"(\S+)") -> Check:
    path = shutil.which(name)
    if not path:
        return Check(name, False, "not found", f"{APT} {package}")
    found = path
    if version_cmd:
        found += f" ({_version(version_cmd, pattern)})"
    return Check(name, True, found, "")


def _guest_image() -> list[Check]:
    from bench.vm import initramfs, kernel

    try:
        k, problem = kernel.find_kernel(), ""
    except (kernel.KernelBuildError, OSError) as exc:
        k, problem = None, str(exc)
    fix = ""
    if k is None:
        wants_stock = not problem and kernel.mode() == "stock"
        fix = f"{APT} {kernel.STOCK_PACKAGE}" if wants_stock else \
            "make kernel  (python -m bench.vm.kernel)"
    checks = [Check("guest kernel", k is not None,
                    kernel.describe(k) if k else problem or "no vmlinux built for this config",
                    fix)]
    try:
        i = initramfs.find_initramfs()
        found = f"{i.path} ({i.size / 1e6:.1f} MB)" if i else "not built"
    except initramfs.InitramfsError as exc:
        i, found = None, str(exc)
    checks.append(Check("guest initramfs + agent", i is not None, found,
                        "" if i else "make vm  (python -m bench.vm.initramfs)"))
    return checks


def guest_kernel_info() -> dict[str, str] | None:
    """The guest kernel in use for `doctor --json`: kind, id (config hash / release), path,
    label (as recorded in results) and why it was chosen when that is not obvious."""
    from bench.vm import kernel
    try:
        k = kernel.find_kernel()
    except (kernel.KernelBuildError, OSError):
        return None
    if k is None:
        return None
    return {"kind": k.kind, "id": k.key, "label": k.label, "path": str(k.path),
            "boot": "pvh-vmlinux" if k.pvh else "bzimage", "mode": kernel.mode(), "note": k.note,
            "modules": ",".join(p.name for p in k.modules)}


def _assets() -> list[Check]:
    checks = []
    try:
        from bench.runtimes import assets  # type: ignore[import-not-found]
    except ImportError:
        return [Check("pause binary + rootfs", False, "bench.runtimes.assets missing",
                      "pip install -e .", required=True)]
    for label, fn in (("pause binary", "cached_pause"), ("busybox rootfs", "cached_rootfs")):
        getter = getattr(assets, fn, None)
        path = getter() if getter else None
        ok = bool(path) and Path(path).exists()
        checks.append(Check(label, ok, str(path) if ok else "not built",
                            "" if ok else "python -m bench.runtimes.assets"))
    return checks


def run_checks() -> list[Check]:
    checks = [
        _binary("runc", "runc", ["runc", "--version"], r"runc version (\S+)"),
        _binary("containerd", "containerd", ["containerd", "--version"], r"containerd \S+ (\S+)"),
        _binary("containerd-shim-runc-v2", "containerd"),
        _binary("ctr", "containerd"),
        _binary("qemu-system-x86_64", "qemu-system-x86",
                ["qemu-system-x86_64", "--version"], r"version (\S+)"),
        _binary("busybox", "busybox-static"),
    ]
    bb = shutil.which("busybox")
    if bb:
        static = _is_static_elf(Path(bb))
        checks.append(Check("busybox is static", static, bb, f"{APT} busybox-static"))
    checks.append(Check("running as root", os.geteuid() == 0, f"euid {os.geteuid()}",
                        "run as root (runc, namespaces and mounts need it)"))
    checks += _assets()
    checks += _guest_image()
    accel = accel_mode()
    checks.append(Check("accelerator", True, accel + (" (kvm_intel/kvm_amd loaded)" if accel == "kvm"
                        else " (no kvm_intel/kvm_amd: software emulation)"), "", required=False))
    return checks


def _is_static_elf(path: Path) -> bool:
    # No PT_INTERP program header means no dynamic loader: good enough without `file`.
    try:
        data = path.read_bytes()[:65536]
    except OSError:
        return False
    return b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench doctor", description=__doc__)
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args(argv)
    checks = run_checks()
    ok = all(c.ok for c in checks if c.required)
    if ns.json:
        print(json.dumps({"ok": ok, "accel": accel_mode(), "guest_kernel": guest_kernel_info(),
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = "ok " if c.ok else ("MISSING" if c.required else "absent ")
            line = f"{mark:7} {c.name.ljust(width)}  {c.found}"
            if not c.ok and c.fix:
                line += f"\n{'':7} {'':{width}}  fix: {c.fix}"
            print(line)
        print("all prerequisites present" if ok else "some prerequisites are missing (see fix:)")
    return 0 if ok else 1
