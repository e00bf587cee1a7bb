"""Owns: the sandboxer's per-sandbox records, id validation and their persistence.

One JSON file per sandbox (`<dir>/<id>/sandbox.json`, written to a temp file and renamed so a
kill -9 never leaves a torn file).  No fsync: recovery is for a crashed sandboxer process, not a
crashed host (the pinned namespaces and containers do not survive a reboot either).
Records stay small on purpose: the per-pod memory target is ≤ 0.2 MB PSS at 50 pods.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Container/sandbox ids become path components and runc/cgroup names: no '/', no leading '.',
# bounded length (CRI ids are 64 hex chars).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_EXEC_RE = _ID_RE

SANDBOX_FILE = "sandbox.json"

# Sandbox lifecycle.
CREATED = "created"
READY = "ready"
STOPPED = "stopped"

# Container (task) lifecycle; "prepared" = known from Prepare/Update, no runc container yet.
C_PREPARED = "prepared"
C_CREATED = "created"
C_RUNNING = "running"
C_STOPPED = "stopped"


class BadId(ValueError):
    pass


def check_id(value: str, what: str = "sandbox id") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise BadId(f"invalid {what} {value!r}: want 1-128 of [A-Za-z0-9_.-], "
                    f"starting with a letter or digit")
    return value


@dataclass(eq=False)
class Container:
    id: str
    bundle: str = ""           # our bundle directory (config.json inside)
    status: str = C_PREPARED
    prepared: bool = False     # announced by Prepare/Update (kept after Task.Delete until Purge)
    rootfs: list[dict[str, Any]] = field(default_factory=list)  # mounts to put on bundle/rootfs
    rootfs_mounted: bool = False
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    pid: int = 0
    exit_status: int = 0
    exited_at_ns: int = 0      # wall clock (time.time_ns) of the exit
    killed_with: int = 0       # last signal we sent (exit code guess when we cannot reap)
    runc_gone: bool = False    # `runc delete` done (by Stop); Task.Delete only drops the record
    execs: dict[str, dict[str, Any]] = field(default_factory=dict)  # announced exec processes
    # runtime only, never persisted
    exited: asyncio.Event | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "exited"}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Container":
        known = {f.name for f in fields(cls)} - {"exited"}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(eq=False)
class Sandbox:
    id: str
    dir: str
    state: str = CREATED
    pod: str = ""              # pod name from PodSandboxConfig (spans use the sandbox id, like the engine)
    hostname: str = ""
    netns_path: str = ""
    pinned: list[str] = field(default_factory=list)  # OCI ns types pinned under ns/
    created_at_ns: int = 0
    exited_at_ns: int = 0
    exit_status: int = 0
    containers: dict[str, Container] = field(default_factory=dict)
    backend: str = "runc"      # runc (pinned namespaces) | vm (a microVM, bench.sandboxer.vms)
    boot: str = ""             # vm: restore | cold
    vm: dict[str, Any] = field(default_factory=dict)  # vm: MicroVM.record() while it runs
    # runtime only
    ended: asyncio.Event | None = field(default=None, repr=False)
    lock: asyncio.Lock | None = field(default=None, repr=False)
    task_server: Any = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def ns_dir(self) -> Path:
        return self.path / "ns"

    @property
    def task_socket(self) -> str:
        return str(self.path / "task.sock")

    @property
    def agent_socket(self) -> str:
        """vm backend: the host end of the guest agent's port (bench.vm.qemu's layout)."""
        return str(self.path / "agent.sock")

    @property
    def runc_root(self) -> str:
        return str(self.path / "runc")

    def ns_file(self, ns_type: str) -> str:
        from bench.sandboxer.nspin import ns_file
        return ns_file(self.ns_dir, ns_type)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "dir": self.dir, "state": self.state, "pod": self.pod,
            "hostname": self.hostname, "netns_path": self.netns_path, "pinned": self.pinned,
            "created_at_ns": self.created_at_ns, "exited_at_ns": self.exited_at_ns,
            "exit_status": self.exit_status,
            "containers": {k: c.to_json() for k, c in self.containers.items()},
            "backend": self.backend, "boot": self.boot, "vm": self.vm,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Sandbox":
        sb = cls(id=check_id(d["id"]), dir=d["dir"], state=d.get("state", CREATED),
                 pod=d.get("pod", ""), hostname=d.get("hostname", ""),
                 netns_path=d.get("netns_path", ""), pinned=list(d.get("pinned", [])),
                 created_at_ns=d.get("created_at_ns", 0),
                 exited_at_ns=d.get("exited_at_ns", 0), exit_status=d.get("exit_status", 0),
                 backend=d.get("backend", "runc"), boot=d.get("boot", ""),
                 vm=dict(d.get("vm") or {}))
        for cid, cd in d.get("containers", {}).items():
            sb.containers[check_id(cid, "container id")] = Container.from_json(cd)
        return sb

    def save(self) -> None:
        p = self.path / SANDBOX_FILE
        tmp = p.with_name(SANDBOX_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, p)


def load_all(root: Path) -> list[Sandbox]:
    """Every sandbox persisted under `root`; unreadable records are skipped (and reported)."""
    out = []
    if not root.is_dir():
        return out
    for sub in sorted(root.iterdir()):
        f = sub / SANDBOX_FILE
        if not f.is_file():
            continue
        try:
            sb = Sandbox.from_json(json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            import logging
            logging.getLogger(__name__).error("skipping unreadable %s: %s", f, exc)
            continue
        if sb.id != sub.name:
            continue
        sb.dir = str(sub)
        out.append(sb)
    return out
