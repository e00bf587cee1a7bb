"""Owns: the engine's configuration file (TOML) and its validated dataclasses.

```
listen = "/run/chainbench/engine.sock"
state_dir = "/run/chainbench/engine"
trace_dir = ""
default_runtime = "shim"
[runtimes.shim]    controller = "shim",      shim_binary = "containerd-shim-runc-v2"
[runtimes.sandbox] controller = "sandboxer", address = "/run/chainbench/sandboxer.sock", schema = "current"
```
Optional keys: `namespace` (containerd namespace given to shims, default "chainbench"),
`call_timeout_s` (deadline of one backend call, default 30), `stop_timeout_s` (grace period of
StopContainer/StopPodSandbox when the client gives none, default 10),
`trace_flush_s` (span flush period, default 1.0), `[runtimes.X] sandboxer` (the sandboxer name
sent on the Sandbox API, default the handler name), `[runtimes.X] vm = true` (pods of this
runtime live in a microVM: containers join no host namespaces, and Task.Create carries the OCI
process in `options` because the guest cannot read the host's bundle).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTROLLER_KINDS = ("shim", "sandboxer")
SANDBOX_SCHEMAS = ("legacy", "current")


class ConfigError(ValueError):
    """The config file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class RuntimeConfig:
    """One CRI runtime handler and the controller that serves it."""

    name: str
    controller: str  # "shim" | "sandboxer"
    shim_binary: str = "containerd-shim-runc-v2"
    address: str = ""  # sandboxer socket (sandboxer controller)
    schema: str = "current"  # Sandbox API schema (sandboxer controller)
    sandboxer: str = ""  # name sent in the `sandboxer` field; default = handler name
    vm: bool = False  # pods run in a microVM (the pause/containers' pids are guest pids)


@dataclass(frozen=True)
class EngineConfig:
    listen: str
    state_dir: str
    runtimes: dict[str, RuntimeConfig]
    default_runtime: str
    trace_dir: str = ""
    namespace: str = "chainbench"
    call_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0
    trace_flush_s: float = 1.0

    def runtime(self, handler: str) -> RuntimeConfig:
        """The runtime for a CRI `runtime_handler` ("" = default); KeyError if unknown."""
        return self.runtimes[handler or self.default_runtime]


def _str(table: dict[str, Any], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string, got {type(value).__name__}")
    return value


def _bool(table: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _float(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _runtime(name: str, table: Any) -> RuntimeConfig:
    where = f"[runtimes.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    kind = _str(table, "controller", "", where)
    if kind not in CONTROLLER_KINDS:
        raise ConfigError(f"{where}: controller must be one of {CONTROLLER_KINDS}, got {kind!r}")
    rt = RuntimeConfig(
        name=name,
        controller=kind,
        shim_binary=_str(table, "shim_binary", "containerd-shim-runc-v2", where),
        address=_str(table, "address", "", where),
        schema=_str(table, "schema", "current", where),
        sandboxer=_str(table, "sandboxer", name, where),
        vm=_bool(table, "vm", False, where),
    )
    if kind == "sandboxer":
        if not rt.address:
            raise ConfigError(f"{where}: a sandboxer runtime needs `address` (its socket path)")
        if rt.schema not in SANDBOX_SCHEMAS:
            raise ConfigError(f"{where}: schema must be one of {SANDBOX_SCHEMAS}, got {rt.schema!r}")
    elif not rt.shim_binary:
        raise ConfigError(f"{where}: shim_binary must not be empty")
    return rt


def parse_config(data: dict[str, Any], where: str = "engine config") -> EngineConfig:
    known = {"listen", "state_dir", "trace_dir", "default_runtime", "runtimes", "namespace",
             "call_timeout_s", "stop_timeout_s", "trace_flush_s"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    runtimes_table = data.get("runtimes", {})
    if not isinstance(runtimes_table, dict) or not runtimes_table:
        raise ConfigError(f"{where}: at least one [runtimes.NAME] table is required")
    runtimes = {name: _runtime(name, t) for name, t in runtimes_table.items()}
    default = _str(data, "default_runtime", next(iter(runtimes)), where)
    if default not in runtimes:
        raise ConfigError(f"{where}: default_runtime {default!r} is not one of {sorted(runtimes)}")
    listen = _str(data, "listen", "/run/chainbench/engine.sock", where)
    state_dir = _str(data, "state_dir", "/run/chainbench/engine", where)
    if not listen or not state_dir:
        raise ConfigError(f"{where}: listen and state_dir must not be empty")
    return EngineConfig(
        listen=listen.removeprefix("unix://"),
        state_dir=state_dir,
        runtimes=runtimes,
        default_runtime=default,
        trace_dir=_str(data, "trace_dir", "", where),
        namespace=_str(data, "namespace", "chainbench", where),
        call_timeout_s=_float(data, "call_timeout_s", 30.0, where),
        stop_timeout_s=_float(data, "stop_timeout_s", 10.0, where),
        trace_flush_s=_float(data, "trace_flush_s", 1.0, where),
    )


def load_config(path: str | Path) -> EngineConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read engine config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"engine config {p} is not valid TOML: {exc}") from exc
    return parse_config(data, str(p))
