"""Owns: translating CRI container requests into OCI runtime specs for the engine's bundles.

There is no image service: every image maps to the shared busybox rootfs built by
`bench.runtimes.assets` (read-only, with a tmpfs /tmp), so `ImageSpec.image` is recorded but
not resolved.  An empty command runs `/pause` (a process that sleeps until signalled), the
closest thing to an image's default entrypoint this rootfs has.
"""
from __future__ import annotations

from typing import Any, Mapping

from bench.engine.errors import invalid
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.runtimes import oci

DEFAULT_COMMAND = ["/pause"]
MAX_ARGS = 4096
MAX_ARG_BYTES = 1 << 20


def container_args(config: cri.ContainerConfig) -> list[str]:
    args = list(config.command) + list(config.args)
    if not args:
        return list(DEFAULT_COMMAND)
    if len(args) > MAX_ARGS or sum(len(a) for a in args) > MAX_ARG_BYTES:
        raise invalid(f"container command line is too long ({len(args)} arguments)")
    if any("\0" in a for a in args):
        raise invalid("container command contains a NUL byte")
    return args


def container_env(config: cri.ContainerConfig) -> list[str]:
    env = [oci.DEFAULT_PATH]
    for kv in config.envs:
        key = kv.key if isinstance(kv.key, str) else kv.key.decode()
        value = kv.value if isinstance(kv.value, str) else bytes(kv.value).decode("utf-8", "replace")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise invalid(f"bad environment variable name {key!r}")
        env.append(f"{key}={value}")
    return env


def pod_cgroup_path(pod_config: cri.PodSandboxConfig, id_: str) -> str | None:
    """`<cgroup_parent>/<id>` when the pod names a parent (CRI semantics), else runtimes' default.

    Honouring the parent is what lets a run find (and kill) every process of its pods by cgroup,
    as containerd does; the parent comes from the wire, so it is checked before use in a path.
    """
    parent = pod_config.linux.cgroup_parent if pod_config.HasField("linux") else ""
    if not parent:
        return None
    parts = [p for p in parent.split("/") if p]
    if (not parent.startswith("/") or len(parent) > 512 or not parts
            or any(p in (".", "..") for p in parts)):
        raise invalid(f"cgroup_parent {parent!r} must be an absolute path without . or ..")
    return f"/{'/'.join(parts)}/{id_}"


def build_container_spec(container_id: str, config: cri.ContainerConfig, rootfs: str,
                         join: Mapping[str, str], *,
                         annotations: Mapping[str, str] | None = None,
                         cgroups_path: str | None = None) -> dict[str, Any]:
    """OCI spec of a workload container joining the pod namespaces in `join`."""
    cwd = config.working_dir or "/"
    if not cwd.startswith("/"):
        raise invalid(f"working_dir {cwd!r} must be an absolute path")
    mem = config.linux.resources.memory_limit_in_bytes if config.HasField("linux") else 0
    try:
        return oci.container_spec(rootfs, container_id, container_args(config), join=join,
                                  env=container_env(config), cwd=cwd,
                                  memory_limit=mem or None, cgroups_path=cgroups_path,
                                  annotations=dict(annotations or {}))
    except oci.SpecError as exc:
        raise invalid(f"cannot build the container spec: {exc}") from exc
