"""Owns: the engine's on-disk state: directory layout, atomic JSON writes and loading.

Layout under `state_dir`:
```
sandboxes/<sid>/metadata.json        SandboxMeta (written once)
sandboxes/<sid>/state.json           SandboxStatusRec (each persisted transition)
sandboxes/<sid>/containers/<cid>.json  Container
sandboxes/<sid>/sandbox_tasks.json   tasks document sent to a sandboxer (current schema)
bundles/<id>/                        OCI bundles (pause and containers; dir name = id, as the
                                     runc shim's `delete` action derives the id from it)
```
Writes go to a temp file in the same directory and are renamed over the target, so a killed
engine leaves either the old or the new file, never a torn one.  No fsync: recovery is for a
crashed engine process, not a crashed host (pods, shims and pinned namespaces do not survive a
reboot either), and the sandboxer makes the same choice, so neither chain pays for it.  Every
id is validated before it becomes a path component.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.engine.ids import ID_RE, check_id
from bench.engine.sandbox import Container, SandboxMeta, SandboxStatusRec

log = logging.getLogger("chainbench.engine.store")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, sort_keys=True).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class LoadedSandbox:
    meta: SandboxMeta
    status: SandboxStatusRec
    containers: list[Container] = field(default_factory=list)


class Store:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.sandboxes = self.root / "sandboxes"
        self.bundles = self.root / "bundles"

    def init(self) -> None:
        for d in (self.root, self.sandboxes, self.bundles):
            d.mkdir(parents=True, exist_ok=True, mode=0o711)

    # -- paths ---------------------------------------------------------------------------
    def sandbox_dir(self, sid: str) -> Path:
        return self.sandboxes / check_id(sid, "sandbox id")

    def bundle_dir(self, id_: str) -> Path:
        return self.bundles / check_id(id_, "bundle id")

    def container_file(self, sid: str, cid: str) -> Path:
        return self.sandbox_dir(sid) / "containers" / f"{check_id(cid, 'container id')}.json"

    # -- writes --------------------------------------------------------------------------
    def create_sandbox(self, meta: SandboxMeta, status: SandboxStatusRec) -> None:
        d = self.sandbox_dir(meta.id)
        (d / "containers").mkdir(parents=True, exist_ok=False)
        write_json_atomic(d / "metadata.json", meta.to_json())
        write_json_atomic(d / "state.json", status.to_json())

    def save_status(self, sid: str, status: SandboxStatusRec) -> None:
        write_json_atomic(self.sandbox_dir(sid) / "state.json", status.to_json())

    def save_container(self, ctr: Container) -> None:
        write_json_atomic(self.container_file(ctr.sandbox_id, ctr.id), ctr.to_json())

    def delete_container(self, sid: str, cid: str) -> None:
        try:
            self.container_file(sid, cid).unlink()
        except FileNotFoundError:
            pass

    def save_tasks(self, sid: str, doc: dict[str, Any]) -> None:
        """The `{"tasks": [...]}` document last sent to a sandboxer (iSulad's
        sandbox_tasks.json), so Update can resend the full list after a restart."""
        write_json_atomic(self.sandbox_dir(sid) / "sandbox_tasks.json", doc)

    def load_tasks(self, sid: str) -> dict[str, Any]:
        try:
            doc = json.loads((self.sandbox_dir(sid) / "sandbox_tasks.json").read_text())
        except FileNotFoundError:
            return {"tasks": []}
        if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
            raise ValueError(f"sandbox {sid}: malformed sandbox_tasks.json")
        return doc

    def delete_sandbox(self, sid: str) -> None:
        shutil.rmtree(self.sandbox_dir(sid), ignore_errors=True)

    def remove_bundle(self, id_: str) -> None:
        shutil.rmtree(self.bundle_dir(id_), ignore_errors=True)

    # -- recovery ------------------------------------------------------------------------
    def load_all(self) -> list[LoadedSandbox]:
        """Every sandbox on disk; unreadable ones are logged and left in place (never
        deleted: a human may want them, and nothing is lost silently)."""
        out: list[LoadedSandbox] = []
        if not self.sandboxes.is_dir():
            return out
        for d in sorted(self.sandboxes.iterdir()):
            if not d.is_dir() or not ID_RE.fullmatch(d.name):
                if not d.name.startswith("."):
                    log.warning("ignoring unexpected entry %s in the state dir", d)
                continue
            try:
                meta = SandboxMeta.from_json(json.loads((d / "metadata.json").read_text()))
                status = SandboxStatusRec.from_json(json.loads((d / "state.json").read_text()))
                if meta.id != d.name:
                    raise ValueError(f"metadata id {meta.id!r} does not match the directory")
            except (OSError, ValueError, TypeError) as exc:
                log.error("cannot load sandbox %s: %s", d.name, exc)
                continue
            loaded = LoadedSandbox(meta, status)
            cdir = d / "containers"
            for f in sorted(cdir.glob("*.json")) if cdir.is_dir() else []:
                try:
                    ctr = Container.from_json(json.loads(f.read_text()))
                    check_id(ctr.id, "container id")
                    if ctr.sandbox_id != meta.id or f.stem != ctr.id:
                        raise ValueError("container record does not match its location")
                except (OSError, ValueError, TypeError) as exc:
                    log.error("cannot load container %s of sandbox %s: %s", f.name, d.name, exc)
                    continue
                loaded.containers.append(ctr)
            out.append(loaded)
        return out
