"""Owns: OCI runtime spec (config.json) building for pause and workload containers, and bundles.

`SpecOptions` (a dataclass) → `build_spec()` → dict; `write_bundle()` writes `config.json`
atomically.  Rules learnt on this machine (DESIGN §7) are encoded here: no `oomScoreAdj` (fails
without CAP_SYS_RESOURCE), no hostname when the pod has no UTS namespace (host-network pods),
and a read-only shared rootfs with a tmpfs /tmp.

Pod layout: the pause container creates the pod namespaces (ipc, uts unless host network, net
unless host network, pid when the pod shares one); workload containers join them through
`/proc/<pause pid>/ns/<type>` (or bind-mounted ns files a sandboxer pins) and get their own mount
namespace (and pid namespace unless shared).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# containerd's default capability set for CRI containers
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup")
# containerd's identifier rule (also keeps ids safe inside paths)
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_ID_LEN = 76
CGROUP_PARENT = "/chainbench"


class SpecError(ValueError):
    pass


def validate_id(value: str, what: str = "id") -> str:
    """Raise SpecError unless `value` is a safe container/pod identifier (no '/', no '..')."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN \
            or not _ID_RE.match(value):
        raise SpecError(f"invalid {what} {value!r}: want [A-Za-z0-9] words joined by . _ -, "
                        f"at most {MAX_ID_LEN} chars")
    return value


@dataclass
class Namespace:
    """A namespace to create (`path=None`) or to join (`path` = /proc/PID/ns/TYPE or a pin)."""

    type: str
    path: str | None = None

    def to_dict(self) -> dict[str, str]:
        if self.type not in NAMESPACE_TYPES:
            raise SpecError(f"unknown namespace type {self.type!r}")
        d = {"type": self.type}
        if self.path:
            d["path"] = self.path
        return d


def ns_path(pid: int, ns_type: str) -> str:
    """The /proc path of a process's namespace, by OCI type name."""
    proc_name = {"network": "net", "mount": "mnt"}.get(ns_type, ns_type)
    return f"/proc/{pid}/ns/{proc_name}"


def default_mounts(*, tmp_size: str = "16m") -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", f"size={tmp_size}"]},
    ]


@dataclass
class SpecOptions:
    """Everything that varies between our containers; the rest of the spec is fixed."""

    args: list[str]
    root: str
    readonly_root: bool = True
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    terminal: bool = False
    hostname: str | None = None
    namespaces: list[Namespace] = field(default_factory=list)
    mounts: list[dict[str, Any]] | None = None  # None = default_mounts()
    extra_mounts: list[dict[str, Any]] = field(default_factory=list)
    cgroups_path: str | None = None
    memory_limit: int | None = None
    cpu_shares: int | None = None
    pids_limit: int | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))
    no_new_privileges: bool = True
    nofile: int = 1024


def build_spec(o: SpecOptions) -> dict[str, Any]:
    if not o.args:
        raise SpecError("process.args must not be empty")
    types = [n.type for n in o.namespaces]
    if len(types) != len(set(types)):
        raise SpecError(f"duplicate namespace in {types}")
    if o.hostname and "uts" not in types:
        # runc refuses a hostname without a private UTS namespace (host-network pods)
        raise SpecError("hostname needs a uts namespace (omit it for host-network pods)")
    caps = list(o.capabilities)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if o.memory_limit is not None:
        resources["memory"] = {"limit": int(o.memory_limit)}
    if o.cpu_shares is not None:
        resources["cpu"] = {"shares": int(o.cpu_shares)}
    if o.pids_limit is not None:
        resources["pids"] = {"limit": int(o.pids_limit)}
    linux: dict[str, Any] = {
        "namespaces": [n.to_dict() for n in o.namespaces],
        "resources": resources,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if o.cgroups_path:
        linux["cgroupsPath"] = o.cgroups_path
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": o.terminal,
            "user": {"uid": o.uid, "gid": o.gid},
            "args": list(o.args),
            "env": list(o.env),
            "cwd": o.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": o.nofile, "soft": o.nofile}],
            "noNewPrivileges": o.no_new_privileges,
        },
        "root": {"path": o.root, "readonly": o.readonly_root},
        "mounts": (list(o.mounts) if o.mounts is not None else default_mounts())
        + list(o.extra_mounts),
        "linux": linux,
    }
    if o.hostname:
        spec["hostname"] = o.hostname
    if o.annotations:
        spec["annotations"] = dict(o.annotations)
    return spec


def pod_namespaces(*, host_network: bool = True, share_pid: bool = False) -> list[str]:
    """Namespace types a pod (its pause container, or a sandboxer's pins) owns."""
    types = ["ipc"]
    if not host_network:
        types += ["uts", "network"]
    if share_pid:
        types.append("pid")
    return types


def pause_spec(root: str, pod_id: str, *, pause_path: str = "/pause", host_network: bool = True,
               hostname: str | None = None, share_pid: bool = False,
               cgroups_path: str | None = None,
               annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Spec of a pod's pause container: it creates the pod namespaces and sleeps.

    A pause always gets its own pid namespace (it is PID 1 and reaps); `share_pid` only decides
    whether workload containers later join it."""
    validate_id(pod_id, "pod id")
    types = pod_namespaces(host_network=host_network, share_pid=share_pid)
    if "pid" not in types:
        types.append("pid")
    nss = [Namespace(t) for t in types] + [Namespace("mount")]
    return build_spec(SpecOptions(
        args=[pause_path], root=root, namespaces=nss,
        hostname=None if host_network else (hostname or None),
        cgroups_path=cgroups_path or f"{CGROUP_PARENT}/{pod_id}",
        annotations=dict(annotations or {}),
        capabilities=[], mounts=_pause_mounts(), pids_limit=None))


def _pause_mounts() -> list[dict[str, Any]]:
    # the pause only sleeps: skip sysfs/mqueue/devpts/tmp to keep its create cheap
    return [m for m in default_mounts() if m["destination"] in ("/proc", "/dev", "/dev/shm")]


def container_spec(root: str, container_id: str, args: Iterable[str], *,
                   join: Mapping[str, str] | None = None, env: Iterable[str] | None = None,
                   cwd: str = "/", hostname: str | None = None,
                   cgroups_path: str | None = None, memory_limit: int | None = None,
                   annotations: Mapping[str, str] | None = None,
                   readonly_root: bool = True) -> dict[str, Any]:
    """Spec of a workload container joining `join` = {ns type: path} (e.g. from
    `join_pod_namespaces(pause_pid)`); it gets a new mount namespace and a new pid namespace
    unless `join` has one."""
    validate_id(container_id, "container id")
    join = dict(join or {})
    nss = [Namespace(t, p) for t, p in join.items()]
    for t in ("mount", "pid"):
        if t not in join:
            nss.append(Namespace(t))
    if "mount" in join:
        raise SpecError("a container never joins another mount namespace")
    return build_spec(SpecOptions(
        args=list(args), root=root, namespaces=nss, cwd=cwd,
        env=list(env) if env is not None else [DEFAULT_PATH],
        hostname=hostname if "uts" in join else None,
        cgroups_path=cgroups_path or f"{CGROUP_PARENT}/{container_id}",
        memory_limit=memory_limit, annotations=dict(annotations or {}),
        readonly_root=readonly_root))


def join_pod_namespaces(pause_pid: int, *, host_network: bool = True,
                        share_pid: bool = False) -> dict[str, str]:
    """{type: /proc/<pause pid>/ns/<type>} for the namespaces a container joins in a pod."""
    return {t: ns_path(pause_pid, t)
            for t in pod_namespaces(host_network=host_network, share_pid=share_pid)}


def write_bundle(bundle_dir: str | os.PathLike[str], spec: Mapping[str, Any]) -> Path:
    """Create the bundle dir (0711) and write config.json atomically; returns the bundle path.

    An empty `rootfs/` dir is created too: the shim's delete action unmounts `<bundle>/rootfs`
    and the spec's root path is absolute (the shared rootfs), so nothing is mounted there."""
    b = Path(bundle_dir)
    b.mkdir(mode=0o711, parents=True, exist_ok=True)
    (b / "rootfs").mkdir(mode=0o711, exist_ok=True)
    tmp = b / ".config.json.tmp"
    with open(tmp, "w") as fh:
        json.dump(spec, fh, separators=(",", ":"))
    os.replace(tmp, b / "config.json")
    return b
