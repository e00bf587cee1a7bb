"""Owns: the private real containerd 1.6 peer — its config, images, start and full teardown.

The peer is the yardstick for our shim chain: Debian's containerd with its CRI plugin and the
real runc shim, run with everything private to one directory (root, state, gRPC + ttrpc sockets,
runc root) so it neither sees nor disturbs a system containerd.  No registry is reachable, so the
sandbox (pause) image and the workload (busybox) image are docker-archive tarballs built here
with tarfile + json and imported with `ctr images import`.  Pods are host-network: the CNI dirs
point at empty private directories and RunPodSandbox with NamespaceMode NODE never calls CNI.

Teardown undoes what containerd leaves behind when it stops: the shims (they outlive the
daemon), runc containers, overlay/shm mounts, the shims' sockets under /run/containerd/s and the
whole private directory.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import ProcessRegistry, find_processes, remove_tree, default_registry

log = logging.getLogger(__name__)

CONTAINERD = "containerd"
CTR = "ctr"
RUNC = "runc"
NAMESPACE = "k8s.io"  # the CRI plugin only sees images and containers in this namespace
PAUSE_REF = "chainbench.local/pause:1"
BUSYBOX_REF = "chainbench.local/busybox:1"
IMAGE_LAYOUT = "1"  # bump when the image contents below change

# Plugins that would touch host paths outside our directory or that do not apply here.
_DISABLED_PLUGINS = (
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class PeerError(RuntimeError):
    """The containerd peer could not be configured, started or cleaned."""


# -- images --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFile:
    """One entry of a single-layer image: a file copied from `src`, a symlink, or a directory."""

    path: str  # inside the image, relative ("bin/busybox")
    src: str = ""
    link: str = ""
    mode: int = 0o755


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "root", "root"
    return ti


def _layer_bytes(entries: list[ImageFile], dirs: tuple[str, ...]) -> bytes:
    """An uncompressed, reproducible layer tar (sorted, mtime 0, root-owned)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(set(dirs)):
            tar.addfile(_tarinfo(d + "/", tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        for e in sorted(entries, key=lambda e: e.path):
            if e.link:
                tar.addfile(_tarinfo(e.path, tarfile.SYMTYPE, 0o777, link=e.link))
            else:
                data = Path(e.src).read_bytes()
                tar.addfile(_tarinfo(e.path, tarfile.REGTYPE, e.mode, len(data)), io.BytesIO(data))
    return buf.getvalue()


def build_image_tar(out: Path, ref: str, entries: list[ImageFile], dirs: tuple[str, ...],
                    entrypoint: list[str], cmd: list[str] | None = None) -> Path:
    """Write a docker-archive (`docker save` layout) that `ctr images import` accepts."""
    layer = _layer_bytes(entries, dirs)
    diff_id = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd or [], "WorkingDir": "/",
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "chainbench"}],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [ref],
                            "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"{diff_id}/", None), (f"{diff_id}/layer.tar", layer),
                           (cfg_name, cfg), ("manifest.json", manifest)):
            if data is None:
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
            else:
                tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    tmp.replace(out)
    return out


def _file_key(*paths: str) -> str:
    h = hashlib.sha256(IMAGE_LAYOUT.encode())
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def ensure_images(cache: Path | None = None) -> dict[str, Path]:
    """ref -> tarball for the pause and busybox images, built once per content hash."""
    from bench.runtimes.assets import BUSYBOX, _applets, cache_dir, ensure_pause

    cache = cache or cache_dir()
    pause = str(ensure_pause(cache))
    key = _file_key(pause, BUSYBOX)
    img_dir = cache / "images"
    pause_tar = img_dir / f"pause-{key}.tar"
    busybox_tar = img_dir / f"busybox-{key}.tar"
    base_dirs = ("dev", "proc", "sys", "etc", "tmp", "run", "var")
    if not pause_tar.is_file():
        build_image_tar(pause_tar, PAUSE_REF, [ImageFile("pause", src=pause)], base_dirs,
                        entrypoint=["/pause"])
    if not busybox_tar.is_file():
        entries = [ImageFile("bin/busybox", src=BUSYBOX)]
        entries += [ImageFile(f"bin/{a}", link="busybox") for a in _applets(BUSYBOX)]
        entries += [ImageFile("sbin", link="bin"), ImageFile("usr/bin", link="../bin"),
                    ImageFile("usr/sbin", link="../bin")]
        build_image_tar(busybox_tar, BUSYBOX_REF, entries, base_dirs + ("bin", "usr", "root"),
                        entrypoint=[], cmd=["/bin/sh"])
    return {PAUSE_REF: pause_tar, BUSYBOX_REF: busybox_tar}


def default_snapshotter() -> str:
    """overlayfs when the kernel has it (fast, what users run), else the copying `native`."""
    try:
        if "\toverlay\n" in Path("/proc/filesystems").read_text():
            return "overlayfs"
    except OSError:
        pass
    return "native"


# -- the daemon ------------------------------------------------------------------------------------
def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


@dataclass
class ContainerdPeer:
    """A private containerd: `await start()`, use `endpoint`, `await stop()` (idempotent)."""

    base: Path  # private directory, removed at stop
    registry: ProcessRegistry = field(default_factory=default_registry)
    snapshotter: str = field(default_factory=lambda: default_snapshotter())
    start_timeout_s: float = 30.0
    proc: asyncio.subprocess.Process | None = None
    _shim_sockets: set[str] = field(default_factory=set)
    # Shim socket dirs (/run/containerd/s) that did not exist before us: removed if empty at stop.
    _created_dirs: list[str] = field(default_factory=list)
    _log_fh: object = None

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def runc_root(self) -> Path:
        return self.base / "runc"

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def config_text(self) -> str:
        b = self.base
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        runc = f'{cri[:-1]}.containerd.runtimes.runc]'
        lines = [
            "version = 2",
            f"root = {_toml_str(str(b / 'root'))}",
            f"state = {_toml_str(str(b / 'state'))}",
            f'plugin_dir = ""',
            "disabled_plugins = [" + ", ".join(_toml_str(p) for p in _DISABLED_PLUGINS) + "]",
            "oom_score = 0",
            "",
            "[grpc]",
            f"  address = {_toml_str(str(self.socket))}",
            "[ttrpc]",
            f"  address = {_toml_str(str(self.socket) + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            '  level = "warn"',
            "[metrics]",
            '  address = ""',
            "",
            cri,
            f"  sandbox_image = {_toml_str(PAUSE_REF)}",
            # Our pods may not lower the oom score below the daemon's (DESIGN §7).
            "  restrict_oom_score_adj = true",
            "  disable_apparmor = true",
            "  enable_selinux = false",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_cdi = false",
            f'{cri[:-1]}.containerd]',
            f"  snapshotter = {_toml_str(self.snapshotter)}",
            '  default_runtime_name = "runc"',
            "  discard_unpacked_layers = false",
            runc,
            '  runtime_type = "io.containerd.runc.v2"',
            f'{runc[:-1]}.options]',
            f"  Root = {_toml_str(str(self.runc_root))}",
            "  SystemdCgroup = false",
            f'{cri[:-1]}.cni]',
            f"  bin_dir = {_toml_str(str(b / 'cni' / 'bin'))}",
            f"  conf_dir = {_toml_str(str(b / 'cni' / 'net.d'))}",
            "  max_conf_num = 0",
            "",
        ]
        return "\n".join(lines)

    def write_config(self) -> Path:
        for d in ("root", "state", "cni/bin", "cni/net.d", "runc"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        return self.config_path

    async def start(self, images: dict[str, Path] | None = None) -> None:
        """Start the daemon, wait until CRI answers, import the images."""
        if len(str(self.socket)) + len(".ttrpc") > 107:
            raise PeerError(f"socket path too long for AF_UNIX: {self.socket}")
        self.base.mkdir(parents=True, exist_ok=True)
        self._created_dirs = [d for d in ("/run/containerd/s", "/run/containerd")
                              if not os.path.exists(d)]
        self.write_config()
        images = images if images is not None else await asyncio.to_thread(ensure_images)
        log_path = self.base / "containerd.log"
        self._log_fh = open(log_path, "ab")
        self.proc = await self.registry.spawn(
            CONTAINERD, "--config", str(self.config_path), role="containerd",
            label=str(self.base), stdin=asyncio.subprocess.DEVNULL, stdout=self._log_fh,
            stderr=self._log_fh)
        try:
            await self._wait_ready()
            for ref, tar in images.items():
                await self._ctr("images", "import", "--snapshotter", self.snapshotter, str(tar))
            await self._check_images(list(images))
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        from bench.cri_client import CriClient

        deadline = time.monotonic() + self.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise PeerError(f"containerd exited with {self.proc.returncode}; "
                                f"log: {self.log_tail()}")
            if self.socket.exists():
                client = CriClient(self.endpoint)
                try:
                    await client.version(timeout=2.0)
                    return
                except Exception as exc:  # CRI plugin still initialising
                    last = exc
                finally:
                    await client.close()
            await asyncio.sleep(0.05)
        raise PeerError(f"containerd CRI not ready after {self.start_timeout_s}s ({last}); "
                        f"log: {self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join((self.base / "containerd.log").read_text(errors="replace")
                             .splitlines()[-n:])
        except OSError:
            return "(no log)"

    async def _ctr(self, *args: str, timeout: float = 120.0) -> str:
        rc, out, err = await self.registry.run(
            CTR, "-a", str(self.socket), "-n", NAMESPACE, *args, role="ctr", timeout=timeout)
        if rc != 0:
            raise PeerError(f"ctr {' '.join(args)} failed ({rc}): {err.decode(errors='replace')}")
        return out.decode(errors="replace")

    async def _check_images(self, refs: list[str]) -> None:
        listed = await self._ctr("images", "list", "-q")
        missing = [r for r in refs if r not in listed.split()]
        if missing:
            raise PeerError(f"images {missing} not present after import; have {listed.split()}")

    def shim_processes(self) -> list[int]:
        return [p.pid for p in find_processes(under=self.base,
                                              names=("containerd-shim-runc-v2",))]

    def _record_shim_sockets(self) -> None:
        """Shims listen on /run/containerd/s/<hash> — outside our dir; remember to remove them."""
        task_dir = self.base / "state" / "io.containerd.runtime.v2.task"
        for f in task_dir.glob("*/*/address"):
            try:
                addr = f.read_text().strip()
            except OSError:
                continue
            if addr.startswith("unix://"):
                self._shim_sockets.add(addr[len("unix://"):])

    async def stop_daemon(self) -> list[str]:
        """SIGTERM the daemon (shims, containers and files stay: see `clean`)."""
        forced: list[str] = []
        self._record_shim_sockets()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except asyncio.TimeoutError:
                forced.append(f"containerd pid {self.proc.pid} (SIGKILL)")
                self.proc.kill()
                await self.proc.wait()
        if self.proc is not None:
            self.registry.unregister(self.proc.pid)
        if self._log_fh is not None:
            self._log_fh.close()  # type: ignore[attr-defined]
            self._log_fh = None
        return forced

    async def clean(self) -> list[str]:
        """Remove every trace of the peer; returns what a clean CRI teardown had left."""
        return await asyncio.to_thread(self.clean_now)

    async def stop(self) -> list[str]:
        """Stop the daemon and remove every trace of it (idempotent)."""
        if not self.base.exists() and self.proc is None:
            return []
        forced = await self.stop_daemon()
        return forced + await self.clean()

    def clean_now(self) -> list[str]:
        """Remove what a clean CRI teardown should already have removed; report it."""
        forced: list[str] = []
        if self.runc_root.is_dir():
            for ns_dir in self.runc_root.iterdir():
                if not ns_dir.is_dir():
                    continue
                for cdir in ns_dir.iterdir():
                    forced.append(f"runc container {cdir.name}")
                    subprocess.run([RUNC, "--root", str(ns_dir), "delete", "--force", cdir.name],
                                   capture_output=True, timeout=30)
        self._record_shim_sockets()
        for pid in self.shim_processes():
            forced.append(f"shim pid {pid}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while self.shim_processes() and time.monotonic() < deadline:
            time.sleep(0.02)
        for sock in sorted(self._shim_sockets):
            if os.path.lexists(sock):
                forced.append(f"shim socket {sock}")
                try:
                    os.unlink(sock)
                except OSError:
                    pass
        if self.base.exists():
            remove_tree(self.base)
        for d in self._created_dirs:
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty: another containerd uses it now
        return forced

    def leftovers(self) -> list[str]:
        """Anything of this peer still on the machine (empty after a clean stop)."""
        out = [f"process {p.pid} {' '.join(p.cmdline)[:80]}" for p in find_processes(under=self.base)]
        out += [f"socket {s}" for s in sorted(self._shim_sockets) if os.path.lexists(s)]
        if self.base.exists():
            out.append(f"directory {self.base}")
        return out


__all__ = ["ContainerdPeer", "PeerError", "ensure_images", "build_image_tar", "ImageFile",
           "PAUSE_REF", "BUSYBOX_REF", "NAMESPACE"]
