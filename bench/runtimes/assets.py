"""Owns: the built container assets — the static pause binary and the shared busybox rootfs.

Both are built once into the cache dir (env CHAINBENCH_CACHE, default /var/cache/chainbench)
under a name keyed by a content hash, so a changed `pause.c` or busybox gives a new entry and an
unchanged one is never rebuilt.  Builds happen in a temp dir next to the target and are renamed
into place, so a crashed or concurrent build never leaves a half-made asset under the final name.

The rootfs is shared read-only by every container (OCI `root.readonly: true`; writable /tmp is a
tmpfs in the spec), which is why every mount point the specs use is created here: runc would
otherwise mkdir them inside the shared tree.

CLI: `python -m bench.runtimes.assets [--cache DIR]` builds both and prints their paths.
"""
from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PAUSE_SOURCE = Path(__file__).with_name("pause.c")
PAUSE_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra")
BUSYBOX = "/bin/busybox"
# bump when the rootfs layout below changes
ROOTFS_LAYOUT = "1"
# mount points of oci.default_mounts() and what runc needs under a read-only root
ROOTFS_DIRS = ("bin", "dev", "proc", "sys", "tmp", "etc", "run", "var", "root", "home")
PAUSE_IN_ROOTFS = "/pause"


@dataclass(frozen=True)
class Assets:
    rootfs: Path
    pause: Path


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("CHAINBENCH_CACHE") or "/var/cache/chainbench")


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # keyed on stat so a replaced busybox is re-hashed but an unchanged one is hashed once
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def pause_key() -> str:
    return _sha(PAUSE_SOURCE.read_bytes(), " ".join(PAUSE_CFLAGS).encode())


def rootfs_key(busybox: str = BUSYBOX) -> str:
    st = os.stat(busybox)
    return _sha(_file_digest(os.path.realpath(busybox), st.st_size, st.st_mtime_ns).encode(),
                pause_key().encode(), ROOTFS_LAYOUT.encode())


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished build into place; losing a race to an identical build is fine."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _mktemp(cache: Path, prefix: str) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{prefix}-", dir=cache))


def ensure_pause(cache: Path | None = None) -> Path:
    """Path of the static pause binary, compiling it on first use."""
    cache = cache or cache_dir()
    final = cache / f"pause-{pause_key()}"
    binary = final / "pause"
    if binary.is_file():
        return binary
    tmp = _mktemp(cache, "pause")
    try:
        out = tmp / "pause"
        proc = subprocess.run(["gcc", *PAUSE_CFLAGS, "-o", str(out), str(PAUSE_SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetError(f"gcc failed building pause: {proc.stderr.strip()}")
        os.chmod(out, 0o755)
        os.chmod(tmp, 0o755)
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return binary


def _applets(busybox: str) -> list[str]:
    proc = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    names = [n.strip() for n in proc.stdout.split() if n.strip()]
    # busybox is the only binary: a name with '/' or '..' would escape bin/
    return sorted(n for n in names if "/" not in n and n not in (".", "..", "busybox"))


def ensure_rootfs(cache: Path | None = None, busybox: str = BUSYBOX) -> Path:
    """Path of the shared busybox rootfs (with /pause), building it on first use."""
    cache = cache or cache_dir()
    if not os.path.exists(busybox):
        raise AssetError(f"{busybox} not found: install busybox-static")
    final = cache / f"rootfs-{rootfs_key(busybox)}"
    if (final / "bin" / "busybox").is_file():
        return final
    pause = ensure_pause(cache)
    tmp = _mktemp(cache, "rootfs")
    try:
        os.chmod(tmp, 0o755)
        for d in ROOTFS_DIRS:
            (tmp / d).mkdir(mode=0o755)
        os.chmod(tmp / "tmp", 0o1777)
        shutil.copy2(busybox, tmp / "bin" / "busybox")
        os.chmod(tmp / "bin" / "busybox", 0o755)
        for name in _applets(busybox):
            os.symlink("busybox", tmp / "bin" / name)
        # /usr/bin, /sbin, /usr/sbin resolve to bin so any PATH the spec uses works
        (tmp / "usr").mkdir(mode=0o755)
        os.symlink("../bin", tmp / "usr" / "bin")
        os.symlink("../bin", tmp / "usr" / "sbin")
        os.symlink("bin", tmp / "sbin")
        shutil.copy2(pause, tmp / PAUSE_IN_ROOTFS.lstrip("/"))
        (tmp / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                            "nobody:x:65534:65534:nobody:/:/bin/false\n")
        (tmp / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (tmp / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        (tmp / "etc" / "hostname").write_text("chainbench\n")
        (tmp / "etc" / "chainbench-rootfs").write_text(final.name + "\n")
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_pause(cache: Path | None = None) -> Path | None:
    """The pause binary if already built (never builds; for `chainbench doctor`)."""
    p = (cache or cache_dir()) / f"pause-{pause_key()}" / "pause"
    return p if p.is_file() else None


def cached_rootfs(cache: Path | None = None, busybox: str = BUSYBOX) -> Path | None:
    """The rootfs if already built (never builds)."""
    if not os.path.exists(busybox):
        return None
    p = (cache or cache_dir()) / f"rootfs-{rootfs_key(busybox)}"
    return p if (p / "bin" / "busybox").is_file() else None


def ensure_assets(cache: Path | None = None) -> Assets:
    return Assets(rootfs=ensure_rootfs(cache), pause=ensure_pause(cache))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.runtimes.assets",
                                 description="build the pause binary and busybox rootfs")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache dir (default: $CHAINBENCH_CACHE or /var/cache/chainbench)")
    args = ap.parse_args(argv)
    try:
        a = ensure_assets(args.cache)
    except (AssetError, OSError, subprocess.CalledProcessError) as exc:
        print(f"assets: {exc}", file=sys.stderr)
        return 1
    print(f"rootfs {a.rootfs}")
    print(f"pause  {a.pause}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
