"""Owns: the guest kernel for microVMs: building it from Debian's linux-source-6.1 and finding it.

The build is tinyconfig + `guest-kernel.config` (kept in the repo) and produces the uncompressed
`vmlinux`, which QEMU's microvm machine boots through its PVH entry (DESIGN §7: ~3 s faster than
a bzImage under TCG).  Builds are cached outside the repo by a hash of everything that shapes the
result, so a second build is free and a config change cannot reuse a stale kernel.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FRAGMENT = Path(__file__).resolve().parent / "guest-kernel.config"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
_BUILDER_VERSION = "1"  # bump when the build procedure itself changes


def cache_root() -> Path:
    return Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench"))


@dataclass(frozen=True)
class KernelInfo:
    path: Path
    kind: str  # "tiny" (our build) | "stock" (Debian's, fallback)
    key: str


class KernelBuildError(RuntimeError):
    pass


def build_key(source: Path = SOURCE_TARBALL) -> str:
    h = hashlib.sha256()
    h.update(_BUILDER_VERSION.encode())
    h.update(FRAGMENT.read_bytes())
    st = source.stat() if source.exists() else None
    h.update(f"{source.name}:{st.st_size if st else 0}".encode())
    return h.hexdigest()[:16]


def kernel_dir(key: str) -> Path:
    return cache_root() / "kernels" / key


def find_kernel() -> KernelInfo | None:
    """The cached kernel matching the current config, else None (call `build()`)."""
    if not SOURCE_TARBALL.exists():
        return None
    key = build_key()
    vmlinux = kernel_dir(key) / "vmlinux"
    return KernelInfo(vmlinux, "tiny", key) if vmlinux.is_file() else None


def _run(cmd: list[str], cwd: Path, log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed (exit {rc}); see {log.name}")


def build(jobs: int | None = None, quiet: bool = False) -> KernelInfo:
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(f"{SOURCE_TARBALL} missing: apt-get install -y linux-source-6.1 "
                               "flex bison libelf-dev bc")
    for tool in ("make", "gcc", "flex", "bison", "bc"):
        if not shutil.which(tool):
            raise KernelBuildError(f"{tool} missing: apt-get install -y flex bison libelf-dev bc "
                                   "make gcc")
    found = find_kernel()
    if found:
        return found
    key = build_key()
    dest = kernel_dir(key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".build-{key}-") as tmp:
        work = Path(tmp)
        log_path = dest.parent / f"build-{key}.log"
        with open(log_path, "w") as log:
            if not quiet:
                print(f"guest kernel: extracting {SOURCE_TARBALL.name} ...", file=sys.stderr)
            with tarfile.open(SOURCE_TARBALL) as tf:
                tf.extractall(work, filter="tar")
            src = next(p for p in work.iterdir() if p.is_dir())
            _run(["make", "tinyconfig"], src, log)
            _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)], src, log)
            _run(["make", "olddefconfig"], src, log)
            missing = _missing_options(src / ".config")
            if missing:
                raise KernelBuildError(f"options dropped by Kconfig: {missing}; see {log_path}")
            if not quiet:
                print(f"guest kernel: compiling vmlinux with -j{jobs} (a few minutes) ...",
                      file=sys.stderr)
            _run(["make", f"-j{jobs}", "vmlinux"], src, log)
            staged = work / "out"
            staged.mkdir()
            shutil.copy2(src / "vmlinux", staged / "vmlinux")
            shutil.copy2(src / ".config", staged / "config")
            # Rename is the commit point: a half-built kernel is never found by find_kernel().
            if dest.exists():
                shutil.rmtree(dest)
            staged.rename(dest)
    if not quiet:
        print(f"guest kernel: built in {time.monotonic() - t0:.0f} s -> {dest / 'vmlinux'}",
              file=sys.stderr)
    return KernelInfo(dest / "vmlinux", "tiny", key)


def _missing_options(config: Path) -> list[str]:
    have = set(config.read_text().splitlines())
    want = [ln.strip() for ln in FRAGMENT.read_text().splitlines()
            if ln.strip().startswith("CONFIG_") and ln.strip().endswith("=y")]
    return [w for w in want if w not in have]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vm.kernel", description=__doc__)
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ns = ap.parse_args(argv if argv is not None else sys.argv[1:])
    try:
        info = build(ns.jobs)
    except KernelBuildError as exc:
        print(f"guest kernel: {exc}", file=sys.stderr)
        return 1
    print(info.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
