"""Owns: the guest kernel for microVMs: our tiny build, Debian's stock kernel as the fallback,
and which of the two is in use.

* **tiny** (preferred): `make tinyconfig` + `guest-kernel.config` (kept in the repo) built from
  Debian's linux-source-6.1; the uncompressed `vmlinux`, which QEMU's microvm machine boots
  through its PVH entry (DESIGN §7: ~3 s faster than a bzImage under TCG).  Cached outside the
  repo by a hash of everything that shapes the result, so a second build is free and a config
  change cannot reuse a stale kernel.
* **stock** (fallback): Debian's `linux-image-*-amd64`, when the tiny kernel cannot be built here
  (no linux-source or build tools, or its build failed) or when asked for with
  `CHAINBENCH_GUEST_KERNEL=stock`.  Its compressed bzImage payload is unpacked to a `vmlinux`
  (our own take on the kernel's scripts/extract-vmlinux); the virtio drivers it builds as
  modules go into the initramfs (bench.vm.initramfs), whose init loads them.  When the ELF
  carries no PVH entry note, the bzImage itself is booted instead (slower; `KernelInfo.note`).

`CHAINBENCH_GUEST_KERNEL` = `auto` (default: tiny, else stock) | `tiny` | `stock`.

Boot-time notes (TCG, how the fragment's boot-time lines were found): `initcall_debug
loglevel=7 printk.time=1` on the command line gives per-initcall costs (addresses: map them
with `nm vmlinux`), `cbtrace=1` makes the initramfs's /init print its stage times, and
sampling the vCPU's RIP through QMP (`human-monitor-command` "info registers" every few ms,
mapped with `nm -n vmlinux`) shows where the rest goes.  Found that way: byte-wise `rep
movsb/stosb` from -Os (copying the initramfs, poisoning freed init memory), UP lock-prefix
patching (noreplace-smp), 256 legacy ptys, and the gunzip of a compressed initramfs.
"""
from __future__ import annotations

import argparse
import bz2
import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FRAGMENT = Path(__file__).resolve().parent / "guest-kernel.config"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
_BUILDER_VERSION = "1"  # bump when the build procedure itself changes
ENV = "CHAINBENCH_GUEST_KERNEL"
MODES = ("auto", "tiny", "stock")
STOCK_PACKAGE = "linux-image-amd64"
BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")
# What the agent path needs from a modular kernel, dependencies first (checked against
# modules.dep): the virtio core, its MMIO transport (QEMU microvm's only bus) and the
# virtio-serial console driver that gives the agent /dev/vport0p1.
STOCK_MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_console")
STOCK_BOOT_ARGS = "noreplace-smp"
_BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc")


def cache_root() -> Path:
    return Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench"))


@dataclass(frozen=True)
class KernelInfo:
    path: Path
    kind: str  # "tiny" (our build) | "stock" (Debian's, fallback)
    key: str  # tiny: config hash; stock: kernel release, e.g. 6.1.0-56-amd64
    # stock only: the .ko files init loads, in load order
    modules: tuple[Path, ...] = ()
    # why this kernel, when it is not the obvious one (fallback reason, bzImage boot)
    note: str = ""

    @property
    def label(self) -> str:
        """What results record as the guest kernel: `tiny:<config hash>` / `stock:<release>`."""
        return f"{self.kind}:{self.key}"

    @property
    def pvh(self) -> bool:
        return self.path.name == "vmlinux"

    @property
    def boot_args(self) -> str:
        """Kernel arguments this kernel wants on top of the VMM's (console, tsc, panic).

        The tiny kernel has them built in (CONFIG_CMDLINE in guest-kernel.config); the stock
        kernel needs them on the command line: noreplace-smp skips ~0.27 s of lock-prefix
        patching on one vCPU under TCG."""
        return "" if self.kind == "tiny" else STOCK_BOOT_ARGS


class KernelBuildError(RuntimeError):
    pass


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise KernelBuildError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


# -- tiny: our build ------------------------------------------------------------------------
def build_key(source: Path = SOURCE_TARBALL) -> str:
    h = hashlib.sha256()
    h.update(_BUILDER_VERSION.encode())
    h.update(FRAGMENT.read_bytes())
    st = source.stat() if source.exists() else None
    h.update(f"{source.name}:{st.st_size if st else 0}".encode())
    return h.hexdigest()[:16]


def kernel_dir(key: str) -> Path:
    return cache_root() / "kernels" / key


def _failure_marker(key: str) -> Path:
    return cache_root() / "kernels" / f"build-{key}.failed"


def find_tiny() -> KernelInfo | None:
    """Our cached build for the current config, else None."""
    if not SOURCE_TARBALL.exists():
        return None
    key = build_key()
    vmlinux = kernel_dir(key) / "vmlinux"
    return KernelInfo(vmlinux, "tiny", key) if vmlinux.is_file() else None


def tiny_unbuildable() -> str:
    """Why the tiny kernel cannot be built here ("" when it can)."""
    if not SOURCE_TARBALL.exists():
        return f"{SOURCE_TARBALL} missing"
    missing = [t for t in _BUILD_TOOLS if not shutil.which(t)]
    if missing:
        return f"build tools missing: {' '.join(missing)}"
    marker = _failure_marker(build_key())
    if marker.exists():
        return f"its build failed ({marker.read_text().strip()[:200]}; " \
               f"`python -m bench.vm.kernel --retry` tries again)"
    return ""


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    # Two test sessions asking for the same kernel must not compile it twice on 2 cores.
    path = cache_root() / "kernels" / ".build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path, log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed (exit {rc}); see {log.name}")


def build_tiny(jobs: int | None = None, quiet: bool = False) -> KernelInfo:
    """Build (or find in the cache) our kernel; KernelBuildError when it cannot."""
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(f"{SOURCE_TARBALL} missing: apt-get install -y linux-source-6.1 "
                               "flex bison libelf-dev bc")
    for tool in _BUILD_TOOLS:
        if not shutil.which(tool):
            raise KernelBuildError(f"{tool} missing: apt-get install -y flex bison libelf-dev bc "
                                   "make gcc")
    found = find_tiny()
    if found:
        return found
    with _build_lock():
        found = find_tiny()  # built by whoever held the lock before us
        if found:
            return found
        key = build_key()
        marker = _failure_marker(key)
        if marker.exists():
            raise KernelBuildError(f"an earlier build of {key} failed: {marker.read_text()}")
        try:
            return _compile(key, jobs or os.cpu_count() or 2, quiet)
        except KernelBuildError as exc:
            marker.write_text(str(exc) + "\n")
            raise


def _compile(key: str, jobs: int, quiet: bool) -> KernelInfo:
    dest = kernel_dir(key)
    dest.parent.mkdir(parents=True, exist_ok=True)
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
            # Rename is the commit point: a half-built kernel is never found by find_tiny().
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


# -- stock: Debian's kernel -----------------------------------------------------------------
def _release_order(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def stock_releases(boot: Path = BOOT_DIR, modules_root: Path = MODULES_ROOT) -> list[str]:
    """Installed Debian amd64 kernels that have their modules, newest first."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        release = vmlinuz.name[len("vmlinuz-"):]
        if (modules_root / release / "modules.dep").is_file():
            found.append(release)
    return sorted(found, key=_release_order, reverse=True)


def module_load_order(release: str, wanted: tuple[str, ...] = STOCK_MODULES,
                      modules_root: Path = MODULES_ROOT) -> list[Path]:
    """The .ko files for `wanted` plus their dependencies, each after what it needs.

    Built-in drivers (modules.builtin) need no file and are skipped."""
    base = modules_root / release
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_mod_name(target)] = target
    builtin = set()
    with contextlib.suppress(OSError):
        builtin = {_mod_name(x) for x in (base / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(rel: str, stack: tuple[str, ...]) -> None:
        if rel in order:
            return
        if rel in stack:
            raise KernelBuildError(f"module dependency cycle at {rel}")
        for dep in deps.get(rel, []):
            visit(dep, stack + (rel,))
        order.append(rel)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        rel = by_name.get(key)
        if rel is None:
            raise KernelBuildError(f"{release}: module {name} neither built in nor in modules.dep")
        visit(rel, ())
    return [base / rel for rel in order]


def _mod_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", name)
    return name.replace("-", "_")


# Compressed payload signatures a bzImage may carry (CONFIG_KERNEL_*), tried in this order.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip"), (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x02\x21\x4c\x18", "lz4"),
)


def _decompress(data: bytes, fmt: str) -> bytes:
    # Each decompressor stops at the end of its stream and ignores the padding and the
    # 4-byte size the kernel's build appends after it.
    if fmt == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    if fmt == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    if fmt == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if fmt == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}[fmt]
    if not shutil.which(tool[0]):
        raise KernelBuildError(f"{fmt}-compressed kernel: {tool[0]} is not installed")
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (what scripts/extract-vmlinux finds)."""
    if image[:4] == b"\x7fELF":
        return image
    for magic, fmt in _MAGICS:
        start = 0
        while (pos := image.find(magic, start)) >= 0:
            start = pos + 1
            try:
                out = _decompress(image[pos:], fmt)
            except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError,
                    subprocess.CalledProcessError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    raise KernelBuildError("no compressed ELF kernel found in the image")


XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU's microvm boots an ELF through


def has_pvh_note(elf: bytes) -> bool:
    """Whether an x86-64 ELF kernel carries the Xen PVH 32-bit entry note."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # ELFCLASS64 only
        return False
    e_phoff, = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, = struct.unpack_from("<I", elf, off)
        if p_type != 4:  # PT_NOTE
            continue
        p_offset, = struct.unpack_from("<Q", elf, off + 8)
        p_filesz, = struct.unpack_from("<Q", elf, off + 32)
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def stock_dir(release: str) -> Path:
    return cache_root() / "kernels" / f"stock-{release}"


def find_stock(note: str = "", release: str | None = None) -> KernelInfo | None:
    """Debian's newest installed kernel, its vmlinux unpacked into the cache (once, ~2 s);
    None when none is installed."""
    releases = [release] if release else stock_releases()
    if not releases or not (BOOT_DIR / f"vmlinuz-{releases[0]}").is_file():
        return None
    release = releases[0]
    vmlinuz = BOOT_DIR / f"vmlinuz-{release}"
    dest = stock_dir(release)
    st = vmlinuz.stat()
    stamp = f"{vmlinuz}:{st.st_size}:{st.st_mtime_ns}\n"
    modules = tuple(module_load_order(release))
    if not ((dest / "source").is_file() and (dest / "source").read_text() == stamp):
        _unpack_stock(vmlinuz, dest, stamp)
    if (dest / "vmlinux").is_file():
        return KernelInfo(dest / "vmlinux", "stock", release, modules, note)
    why = "no PVH entry note in its vmlinux: booting the bzImage (slower under TCG)"
    return KernelInfo(vmlinuz, "stock", release, modules, f"{note}; {why}" if note else why)


def _unpack_stock(vmlinuz: Path, dest: Path, stamp: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    elf = extract_vmlinux(vmlinuz.read_bytes())
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        if has_pvh_note(elf):
            (staged / "vmlinux").write_bytes(elf)
        (staged / "source").write_text(stamp)  # written last: the unpack's commit marker
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


# -- which kernel -----------------------------------------------------------------------------
def find_kernel() -> KernelInfo | None:
    """The kernel VMs boot now (see ENV), without compiling; None when it still has to be
    built (`build()`)."""
    m = mode()
    if m == "stock":
        return find_stock(note=f"{ENV}=stock")
    tiny = find_tiny()
    if tiny is not None or m == "tiny":
        return tiny
    why = tiny_unbuildable()
    return find_stock(note=f"fallback: tiny kernel {why}") if why else None


def build(jobs: int | None = None, quiet: bool = False) -> KernelInfo:
    """The kernel to boot, compiling ours if needed; falls back to the stock kernel (auto mode)
    when ours cannot be built."""
    m = mode()
    if m == "stock":
        found = find_stock(note=f"{ENV}=stock")
        if found is None:
            raise KernelBuildError(f"{ENV}=stock but no Debian kernel is installed: "
                                   f"apt-get install -y {STOCK_PACKAGE}")
        return found
    try:
        return build_tiny(jobs, quiet)
    except KernelBuildError as exc:
        if m == "tiny":
            raise
        # the same note find_kernel() gives later, so both name one and the same kernel
        stock = find_stock(note=f"fallback: tiny kernel {tiny_unbuildable() or exc}")
        if stock is None:
            raise KernelBuildError(f"{exc}; no stock kernel to fall back to either: "
                                   f"apt-get install -y {STOCK_PACKAGE}") from exc
        print(f"guest kernel: {exc}\nguest kernel: falling back to Debian's {stock.key}",
              file=sys.stderr)
        return stock


def describe(info: KernelInfo | None) -> str:
    if info is None:
        return "none"
    text = f"{info.label} {info.path}"
    return f"{text} ({info.note})" if info.note else text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vm.kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--retry", action="store_true",
                    help="forget an earlier failed build of this config and try again")
    ap.add_argument("--stock", action="store_true", help="prepare the stock kernel only")
    ns = ap.parse_args(argv if argv is not None else sys.argv[1:])
    try:
        if ns.retry:
            _failure_marker(build_key()).unlink(missing_ok=True)
        info = find_stock(note="--stock") if ns.stock else build(ns.jobs)
        if info is None:
            raise KernelBuildError(f"no Debian kernel installed: apt-get install -y "
                                   f"{STOCK_PACKAGE}")
    except KernelBuildError as exc:
        print(f"guest kernel: {exc}", file=sys.stderr)
        return 1
    print(describe(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
