"""Owns: turning an engine's container description into a runc bundle inside a sandbox.

The engine hands us an OCI spec (legacy Prepare: JSON in `spec.value`; current Update: the
`extensions.tasks` JSON; or a `config.json` in the Task.Create bundle dir).  We write our own
bundle `<dir>/<sandbox>/c/<container>/config.json` whose namespaces point at the sandbox's pinned
ipc/uts files, and mount the container's rootfs mounts onto `<bundle>/rootfs` at Task.Create.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.sandboxer import nspin
from bench.sandboxer.state import Container, Sandbox

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_REC = 16384
MS_RELATIME = 1 << 21

_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
          "noatime": MS_NOATIME, "relatime": MS_RELATIME}
_IGNORED = {"rw", "suid", "dev", "exec", "defaults", "bind", "rbind", "private", "rprivate"}


class SpecError(ValueError):
    pass


def container_dir(sb: Sandbox, cid: str) -> Path:
    return sb.path / "c" / cid


def rewrite_spec(spec: dict[str, Any], sb: Sandbox, cid: str, base: str | None) -> dict[str, Any]:
    """Point the spec at the sandbox's namespaces; make root.path absolute when it refers to
    `base` (the engine's bundle dir).  Mutates and returns `spec`."""
    if not isinstance(spec, dict):
        raise SpecError("OCI spec must be a JSON object")
    if not isinstance(spec.get("process"), dict):
        raise SpecError("OCI spec has no process")
    linux = spec.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise SpecError("OCI spec linux must be an object")
    kept = [ns for ns in linux.get("namespaces") or []
            if isinstance(ns, dict) and ns.get("type") not in ("ipc", "uts", "network")]
    types = {ns.get("type") for ns in kept}
    for t in ("pid", "mount"):
        if t not in types:
            kept.append({"type": t})
    for t in sb.pinned:
        kept.append({"type": t, "path": sb.ns_file(t)})
    if sb.netns_path and "network" not in sb.pinned:
        kept.append({"type": "network", "path": sb.netns_path})
    # Types neither pinned nor given stay out of the list: the host's (host-network pods).
    linux["namespaces"] = kept
    # A pinned uts got the pod's hostname once at Start; a host uts must keep the node's
    # (runc would refuse a hostname there anyway).
    spec.pop("hostname", None)
    if not linux.get("cgroupsPath"):
        # Flat and unique per (sandbox, container): runc delete removes it, no parent left over.
        linux["cgroupsPath"] = f"/chainbench-{sb.id}-{cid}"
    root = spec.setdefault("root", {})
    path = root.get("path") or "rootfs"
    if not os.path.isabs(path) and base is not None:
        root["path"] = os.path.join(base, path)
    else:
        root["path"] = path
    return spec


def write_bundle(sb: Sandbox, c: Container, spec: dict[str, Any], base: str | None) -> None:
    """Write `<bundle>/config.json`.  With rootfs mounts, root.path is `<bundle>/rootfs`."""
    d = container_dir(sb, c.id)
    d.mkdir(parents=True, exist_ok=True)
    if c.rootfs:
        (d / "rootfs").mkdir(exist_ok=True)
        spec.setdefault("root", {})["path"] = "rootfs"
        base = None
    rewrite_spec(spec, sb, c.id, base)
    if not os.path.isabs(spec["root"]["path"]) and not c.rootfs:
        raise SpecError("root.path is relative but no rootfs mounts and no bundle dir given")
    tmp = d / "config.json.tmp"
    tmp.write_text(json.dumps(spec), encoding="utf-8")
    os.replace(tmp, d / "config.json")
    c.bundle = str(d)


def mounts_from_proto(mounts: Any) -> list[dict[str, Any]]:
    return [{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
            for m in mounts]


def mounts_from_json(mounts: Any) -> list[dict[str, Any]]:
    out = []
    for m in mounts or []:
        if not isinstance(m, dict):
            raise SpecError("rootfs entries must be objects")
        out.append({"type": str(m.get("type", "")), "source": str(m.get("source", "")),
                    "target": str(m.get("target", "")),
                    "options": [str(o) for o in m.get("options") or []]})
    return out


def mount_rootfs(c: Container) -> None:
    """Mount the container's rootfs mounts, in order, onto `<bundle>/rootfs`."""
    target = os.path.join(c.bundle, "rootfs")
    os.makedirs(target, exist_ok=True)
    done = 0
    try:
        for m in c.rootfs:
            _mount_one(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            nspin.umount(target)
        raise
    c.rootfs_mounted = bool(c.rootfs)


def unmount_rootfs(c: Container) -> None:
    if not c.rootfs_mounted:
        return
    target = os.path.join(c.bundle, "rootfs")
    for _ in c.rootfs:
        nspin.umount(target)
    c.rootfs_mounted = False


def _mount_one(m: dict[str, Any], target: str) -> None:
    opts = list(m.get("options") or [])
    flags = 0
    data = []
    for o in opts:
        if o in _FLAGS:
            flags |= _FLAGS[o]
        elif o not in _IGNORED:
            data.append(o)
    is_bind = m.get("type") == "bind" or "bind" in opts or "rbind" in opts
    src = m.get("source") or ""
    if is_bind:
        if not os.path.isabs(src):
            raise SpecError(f"bind mount source must be absolute: {src!r}")
        nspin.bind_mount(src, target, MS_REC if "rbind" in opts else 0)
        if flags:
            # Bind mounts ignore ro etc. on the first call: apply them by a remount.
            nspin.mount(None, target, None, MS_REMOUNT | nspin.MS_BIND | flags, None)
        return
    fstype = m.get("type") or ""
    if not fstype:
        raise SpecError("rootfs mount without type")
    nspin.mount(src, target, fstype, flags, ",".join(data) if data else None)


def open_stdio(c: Container) -> tuple[int, int, int]:
    """fds for the container's stdin/stdout/stderr: the engine's FIFOs, else /dev/null.
    FIFOs are opened O_RDWR so the open never blocks on a missing peer (containerd's trick)."""
    fds = []
    try:
        for i, p in enumerate((c.stdin, c.stdout, c.stderr)):
            if p:
                fds.append(os.open(p, os.O_RDWR | os.O_CLOEXEC))
            else:
                fds.append(os.open(os.devnull, (os.O_RDONLY if i == 0 else os.O_WRONLY)
                                   | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1], fds[2]
