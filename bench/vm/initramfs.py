"""Owns: the microVM guest image: an uncompressed cpio initramfs with busybox, minimal Python,
the agent (and, for Debian's stock kernel, the virtio modules it needs).

Contents:
  /bin/busybox + applet links, /init (mounts proc/sys/dev/run/tmp, loads the stock kernel's
  modules if any, then execs the agent as PID 1);
  Debian's /usr/bin/python3.11 and the shared libraries ldd reports for it and its extensions;
  /usr/lib/python311.zip/ (a directory, see PYDIR) — only the modules the agent actually imports
  (stdlib, our ttrpc, Task v2 messages) as sourceless .pyc; protobuf's in /usr/lib/python3.11;
  native extensions in lib-dynload;
  stock kernel only: /usr/lib/chainbench-modules/*.ko (bench.vm.kernel.STOCK_MODULES + deps).

The module set is the agent's real closure: a host run of Debian's python3.11 imports the agent,
serves one Create/Start/Wait/Delete/Exec/Kill round over a socketpair and reports sys.modules.

The image is not compressed: under TCG the guest kernel gunzips at ~1/11 of host speed, which
cost ~0.5 s of every cold boot for a 7 MB image; the uncompressed 17 MB cost only a copy (QEMU
loads the initrd into guest RAM on the host side).  Every MB still costs a copy into the
guest's page cache, hence the trimming.

Built images are cached under $CHAINBENCH_CACHE/initramfs/<key>/initramfs.cpio, the key being
a hash of every input's content (sources, interpreter, busybox, protobuf, kernel modules, this
builder).

Boot tracing: `cbtrace=1` on the kernel command line makes /init print `cb: <stage> <uptime>`
lines on the console (stages: init, modules, exec) to split a cold boot.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.vm.kernel import KernelInfo

REPO = Path(__file__).resolve().parents[2]
GUEST_PYTHON = Path("/usr/bin/python3.11")
BUSYBOX = Path("/bin/busybox")
STDLIB = Path("/usr/lib/python3.11")
_BUILDER_VERSION = "2"

IMAGE_NAME = "initramfs.cpio"
# The guest's python entry: the agent's main() (its argv[1:] are the options, as with -m).
AGENT_MAIN = "import sys; from bench.vm.agent import main; sys.exit(main())"
GUEST_MODULE_DIR = "usr/lib/chainbench-modules"

INIT_SCRIPT = """#!/bin/sh
# chainbench microVM init: minimal mounts, then the Task API agent becomes PID 1.
mount -t proc proc /proc
# cbtrace=1 on the kernel command line (an environment variable here): stage timestamps.
[ -n "$cbtrace" ] && read up _ < /proc/uptime && echo "cb: init $up"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
@MODULES@
# A fixed hash seed: otherwise Python's start blocks in getrandom() until the guest's entropy
# pool is ready (~1.5 s under TCG).  -P/-s/-S: no cwd, user site or site module; no -I, which
# would ignore PYTHONHASHSEED.
export PYTHONHASHSEED=0
[ -n "$cbtrace" ] && read up _ < /proc/uptime && echo "cb: exec $up"
# -c, not -m: -m imports runpy and importlib.util first (~50 ms of a TCG boot).
exec /usr/bin/python3.11 -P -s -S -B -c "@AGENT_MAIN@" --port /dev/vport0p1
"""

# Run by Debian's python3.11 on the host to find the agent's module closure.
_HARVEST = r"""
import sys
sys.path[:0] = [REPO, SITE]
import asyncio, json, os, signal, socket
import encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.aliases
import bench.vm.agent as agent
import bench.vm.agent_port
from bench.rpc.ttrpc import Client
from bench.rpc.pb import task_v2_pb2 as pb
from google.protobuf import any_pb2, empty_pb2
S = agent.SERVICE

async def exercise():
    a, b = socket.socketpair()
    served = asyncio.ensure_future(agent.run(agent.parse_args(["--fd", str(b.fileno())])))
    c = await Client.from_socket(a)
    await c.call(S, "Connect", pb.ConnectRequest(), pb.ConnectResponse, timeout=10)
    proc = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps({"args": ["true"]}).encode())
    await c.call(S, "Create", pb.CreateTaskRequest(id="c", options=proc), pb.CreateTaskResponse)
    await c.call(S, "Start", pb.StartRequest(id="c"), pb.StartResponse)
    await c.call(S, "Wait", pb.WaitRequest(id="c"), pb.WaitResponse)
    await c.call(S, "State", pb.StateRequest(id="c"), pb.StateResponse)
    await c.call(S, "Delete", pb.DeleteRequest(id="c"), pb.DeleteResponse)
    await c.call(S, "Create", pb.CreateTaskRequest(id="p"), pb.CreateTaskResponse)
    await c.call(S, "Start", pb.StartRequest(id="p"), pb.StartResponse)
    await c.call(S, "Exec", pb.ExecProcessRequest(id="p", exec_id="e", spec=proc), empty_pb2.Empty)
    await c.call(S, "Pids", pb.PidsRequest(id="p"), pb.PidsResponse)
    await c.call(S, "Kill", pb.KillRequest(id="p", signal=9), empty_pb2.Empty)
    await c.call(S, "Wait", pb.WaitRequest(id="p"), pb.WaitResponse)
    try:
        await c.call(S, "Delete", pb.DeleteRequest(id="../bad"), pb.DeleteResponse)
    except Exception:
        pass
    await c.close()
    os.kill(os.getpid(), signal.SIGTERM)
    await served

asyncio.run(exercise())
out = {}
for name, mod in list(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec else None
    is_pkg = bool(spec and spec.submodule_search_locations is not None)
    out[name] = [origin, is_pkg]
json.dump(out, sys.stdout)
"""


# Imported only optionally by what the agent uses (asyncio tries ssl); leaving them out saves
# _ssl + libssl + libcrypto, ~5.6 MB of image.
_EXCLUDED = frozenset({"ssl", "_ssl", "_hashlib", "hashlib"})


# Module names of the closure, in import order: the agent imports them all, then deletes the
# zip and the .pyc tree from the guest's tmpfs (-4 MB in every snapshot and clone).
MANIFEST = "/usr/lib/chainbench-agent-modules"


class InitramfsError(RuntimeError):
    pass


@dataclass(frozen=True)
class InitramfsInfo:
    path: Path
    key: str
    size: int  # bytes of the image
    kernel: str = ""  # label of the kernel it was made for (bench.vm.kernel.KernelInfo.label)


def cache_root() -> Path:
    return Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench"))


def _site_packages() -> Path:
    spec = importlib.util.find_spec("google.protobuf")
    if spec is None or not spec.submodule_search_locations:
        raise InitramfsError("protobuf is not installed in this interpreter")
    return Path(list(spec.submodule_search_locations)[0]).parents[1]


def _source_files() -> list[Path]:
    files = [Path(__file__), REPO / "bench/vm/agent.py", REPO / "bench/vm/agent_port.py"]
    files += sorted((REPO / "bench/rpc/ttrpc").glob("*.py"))
    files += sorted((REPO / "bench/rpc/pb").glob("*_pb2.py"))
    files += [REPO / "bench/rpc/pb/__init__.py"]
    return files


def _kernel(kinfo: "KernelInfo | None") -> "KernelInfo | None":
    """The kernel the image is for: the one given, else the one VMs boot now."""
    if kinfo is not None:
        return kinfo
    from bench.vm import kernel
    try:
        return kernel.find_kernel()
    except kernel.KernelBuildError as exc:
        raise InitramfsError(str(exc)) from exc


def build_key(kinfo: "KernelInfo | None" = None) -> str:
    """The cache key of the image for `kinfo` (default: the kernel in use).  Only a stock
    kernel's modules shape the image; every tiny kernel shares one image."""
    kinfo = _kernel(kinfo)
    h = hashlib.sha256(_BUILDER_VERSION.encode())
    if kinfo is not None and kinfo.modules:
        h.update(kinfo.label.encode())
        for ko in kinfo.modules:
            h.update(ko.name.encode())
            h.update(ko.read_bytes())
    for f in _source_files():
        h.update(str(f.relative_to(REPO) if f.is_relative_to(REPO) else f).encode())
        h.update(f.read_bytes())
    site = _site_packages()
    upb = site / "google/_upb"
    h.update((site / "google/protobuf/__init__.py").read_bytes())
    for so in sorted(upb.glob("*.so")):
        h.update(f"{so.name}:{so.stat().st_size}".encode())
    for binary in (GUEST_PYTHON, BUSYBOX):
        st = binary.stat()
        h.update(f"{binary}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def find_initramfs(kinfo: "KernelInfo | None" = None) -> InitramfsInfo | None:
    """The cached image for `kinfo` (default: the kernel in use), else None."""
    kinfo = _kernel(kinfo)
    key = build_key(kinfo)
    path = cache_root() / "initramfs" / key / IMAGE_NAME
    return InitramfsInfo(path, key, path.stat().st_size, kinfo.label if kinfo else "") \
        if path.is_file() else None


def init_script(modules: list[str]) -> str:
    """/init, loading `modules` (image paths, in order) before the agent starts."""
    lines = "".join(f"insmod /{m}\n" for m in modules)
    if lines:
        lines += '[ -n "$cbtrace" ] && read up _ < /proc/uptime && echo "cb: modules $up"\n'
    return INIT_SCRIPT.replace("@MODULES@\n", lines).replace("@AGENT_MAIN@", AGENT_MAIN)


# -- cpio (newc) ------------------------------------------------------------------------------
class _Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + raw)
        self.buf.write(b"\0" * (-(len(hdr) + len(raw)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name == ".":
            return
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self.seen.discard("TRAILER!!!")
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# -- contents ---------------------------------------------------------------------------------
def _harvest(site: Path) -> dict[str, tuple[str | None, bool]]:
    code = _HARVEST.replace("REPO", repr(str(REPO))).replace("SITE", repr(str(site)))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
    res = subprocess.run([str(GUEST_PYTHON), "-I", "-S", "-B", "-c", code], env=env,
                         capture_output=True, timeout=120)
    if res.returncode != 0:
        raise InitramfsError(f"agent closure run failed (exit {res.returncode}): "
                             f"{res.stderr.decode(errors='replace')[-2000:]}")
    return {k: (v[0], v[1]) for k, v in json.loads(res.stdout).items()}


def _ldd(path: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _pyc(source: Path, filename: str) -> bytes:
    import importlib._bootstrap_external as be
    code = compile(source.read_bytes(), filename, "exec", dont_inherit=True, optimize=2)
    # Unchecked-hash pycs: the guest never stats a source to validate them.
    return bytes(be._code_to_hash_pyc(code, b"\0" * 8, checked=False))


# CPython puts <prefix>/lib/python311.zip on sys.path by default (even with -S).  The image
# makes it a *directory* of sourceless .pyc files instead of a zip: zipimport is Python code that
# reopens and seeks the archive for every module, and a plain directory measured ~0.35 s faster
# per TCG cold boot (host: -10% import time).  Keeping the name keeps it on sys.path with no
# PYTHONPATH, and the agent's clean-up (bench.vm.agent, which deletes that path) still removes it.
PYDIR = "usr/lib/python311.zip"


def _place_modules(modules: dict[str, tuple[str | None, bool]], site: Path,
                   cpio: _Cpio) -> list[Path]:
    """Put the closure's .pyc and native files into cpio; returns the native extension files."""
    # site first: the venv may live inside the repo.
    roots = [(site, "site"), (STDLIB, "stdlib"), (REPO, "repo")]
    natives: list[Path] = []
    for name, (origin, is_pkg) in sorted(modules.items()):
        if not origin or origin in ("built-in", "frozen") or name.split(".")[0] in _EXCLUDED:
            continue
        path = Path(origin)
        for root, kind in roots:
            if path.is_relative_to(root):
                rel = path.relative_to(root)
                break
        else:
            continue  # e.g. the harvest's own -c code
        if kind == "stdlib" and rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        if path.suffix == ".so":
            dest = ("usr/lib/python3.11/lib-dynload/" + path.name) if kind == "stdlib" \
                else f"usr/lib/python3.11/{rel}"
            cpio.file(dest, path.read_bytes(), 0o755)
            natives.append(path)
            continue
        if path.suffix != ".py":
            continue
        arc = str(rel.with_suffix(".pyc"))
        # protobuf's `google` (a namespace package holding a native module) stays beside its
        # native part in /usr/lib/python3.11, also on sys.path; the agent deletes it after use.
        dest = f"usr/lib/python3.11/{arc}" if kind == "site" else f"{PYDIR}/{arc}"
        cpio.file(dest, _pyc(path, "/" + dest))
    # getpath's landmark for the standard library (else a warning on every start); the frozen
    # os module is what gets imported.
    cpio.file("usr/lib/python3.11/os.pyc", _pyc(STDLIB / "os.py", "/usr/lib/python3.11/os.pyc"))
    return natives


def _contents(site: Path, kinfo: "KernelInfo | None") -> bytes:
    modules = _harvest(site)
    cpio = _Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "etc", "usr/lib/python3.11/lib-dynload",
              "usr/sbin", "sbin"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        depth = applet.count("/")
        cpio.symlink(applet, "../" * depth + "bin/busybox" if depth else "bin/busybox")
    cpio.symlink("bin/sh", "busybox")
    kos = []
    for ko in (kinfo.modules if kinfo else ()):
        kos.append(f"{GUEST_MODULE_DIR}/{ko.name}")
        cpio.file(kos[-1], ko.read_bytes())
    cpio.file("init", init_script(kos).encode(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    natives = _place_modules(modules, site, cpio)
    names = [n for n in modules if n != "__main__" and n.split(".")[0] not in _EXCLUDED]
    cpio.file(MANIFEST.lstrip("/"), "\n".join(names).encode() + b"\n")
    cpio.file("usr/bin/python3.11", GUEST_PYTHON.read_bytes(), 0o755)
    libs: dict[str, Path] = {}
    for binary in [GUEST_PYTHON, *natives]:
        for lib in _ldd(binary):
            libs.setdefault(lib.name if lib.name.startswith("ld-linux") else str(lib), lib)
    for key, lib in libs.items():
        real = lib.resolve()
        if lib.name.startswith("ld-linux"):
            cpio.file("lib64/" + lib.name, real.read_bytes(), 0o755)
        else:
            # Debian's merged /usr: everything lives in /usr/lib/x86_64-linux-gnu.
            cpio.file("usr/lib/x86_64-linux-gnu/" + lib.name, real.read_bytes(), 0o755)
    cpio.symlink("lib", "usr/lib")
    return cpio.finish()


def build(*, quiet: bool = True, force: bool = False,
          kinfo: "KernelInfo | None" = None) -> InitramfsInfo:
    """Build (or find in the cache) the guest initramfs for the current sources and `kinfo`
    (default: the kernel in use, bench.vm.kernel.find_kernel())."""
    for tool in (GUEST_PYTHON, BUSYBOX):
        if not tool.exists():
            raise InitramfsError(f"{tool} missing: apt-get install -y python3.11 busybox-static")
    kinfo = _kernel(kinfo)
    if not force:
        found = find_initramfs(kinfo)
        if found:
            return found
    key = build_key(kinfo)
    dest = cache_root() / "initramfs" / key
    t0 = time.monotonic()
    raw = _contents(_site_packages(), kinfo)
    label = kinfo.label if kinfo else ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".build-{key}-") as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        (staged / IMAGE_NAME).write_bytes(raw)
        (staged / "info.json").write_text(json.dumps({"key": key, "cpio_bytes": len(raw),
                                                      "kernel": label}))
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)  # the commit point: find_initramfs() never sees half an image
    if not quiet:
        print(f"initramfs: {len(raw) / 1e6:.1f} MB cpio in {time.monotonic() - t0:.1f} s "
              f"-> {dest}" + (f" (modules for {label})" if kinfo and kinfo.modules else ""),
              file=sys.stderr)
    return InitramfsInfo(dest / IMAGE_NAME, key, len(raw), label)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vm.initramfs", description=__doc__)
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ns = ap.parse_args(argv)
    try:
        info = build(quiet=False, force=ns.force)
    except InitramfsError as exc:
        print(f"initramfs: {exc}", file=sys.stderr)
        return 1
    print(info.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
