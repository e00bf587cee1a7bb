"""Owns: the chains under test as running process sets — start, scope, stop and leftover checks.

One `Chain` per name in `sim.vocabulary.CHAINS`, each confined to a private directory
(/run/chainbench/<run-id>/<chain>) and a private cgroup parent (/chainbench-<run-id>/<chain>):
* `shim`: our engine, runtime handler "shim" → ShimController → containerd-shim-runc-v2;
* `sandbox`: our engine + our sandboxer, handler "sandbox" → SandboxerController;
* flavor `microvm`: the shim chain's shim is ours (bench.vmshim, one QEMU microVM per pod), the
  sandboxer runs `--backend vm` (bench.sandboxer.vms); both boot or restore the same VM recipe
  from the same cached template snapshot (`prepare_vm_assets` makes it before the run);
* `containerd`: a private real containerd 1.6 (bench.containerd_peer).
Confinement is what lets several chains run side by side in one session while the probes count
only a chain's own processes, and what makes "nothing left behind" checkable.

Stopping is layered so that an interrupted or failed run still cleans up: the daemons get
SIGTERM, then whatever survived below the chain's directory or in its cgroup is killed, mounts
below the directory are detached, the directory and the cgroups are removed.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.containerd_peer import BUSYBOX_REF, ContainerdPeer
from bench.cri_client import CriClient
from bench.probes import ChainScope
from bench.tracing import read_spans
from bench.processes import (ProcessRegistry, default_registry, find_processes, mounts_below,
                             remove_tree)

RUN_ROOT = Path("/run/chainbench")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ChainError(RuntimeError):
    """A chain's processes could not be started or did not become ready."""


def _toml(s: str) -> str:
    return json.dumps(s)


def cgroup_dirs(parent: str) -> list[Path]:
    """The directories of a cgroup path in every mounted hierarchy (v1 controllers, unified)."""
    rel = parent.strip("/")
    if not rel or ".." in rel.split("/"):
        return []
    out = []
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # pure v2
        p = CGROUP_ROOT / rel
        return [p] if p.exists() else []
    for h in sorted(CGROUP_ROOT.iterdir()):
        p = h / rel
        if h.is_dir() and not h.is_symlink() and p.exists():
            out.append(p)
    return out


def remove_cgroups(parent: str) -> list[str]:
    """rmdir the cgroup subtree in every hierarchy, deepest first; returns what stayed."""
    stuck: list[str] = []
    for top in cgroup_dirs(parent):
        subdirs = sorted((d for d in top.rglob("*") if d.is_dir()),
                         key=lambda d: -len(d.parts))
        for d in [*subdirs, top]:
            for _ in range(50):  # a just-killed task leaves the cgroup a moment later
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                stuck.append(str(d))
    return stuck


def kill_cgroup_tasks(parent: str) -> list[int]:
    """SIGKILL every task in the cgroup subtree (orphaned pause/container processes)."""
    pids: set[int] = set()
    for top in cgroup_dirs(parent):
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except (OSError, ValueError):
                continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(pids)


@dataclass
class Chain:
    """Base: one chain's private dir, cgroup parent, CRI endpoint and runtime handler."""

    name: str
    base: Path
    cgroup_parent: str
    registry: ProcessRegistry = field(default_factory=default_registry)
    handler: str = ""
    image: str = BUSYBOX_REF
    started: bool = False
    spans: list[dict[str, object]] = field(default_factory=list)
    # A/B variants: the daemons we start run another tree's code (PYTHONPATH and cwd point at
    # it, since `python -m` puts cwd first on sys.path) with extra environment; None = ours.
    code_tree: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def daemon_env(self) -> dict[str, str] | None:
        """Environment for our daemons; None (inherit) when no variant is set."""
        if self.code_tree is None and not self.extra_env:
            return None
        env = dict(os.environ)
        if self.code_tree is not None:
            env["PYTHONPATH"] = str(self.code_tree)
        env.update(self.extra_env)
        return env

    def daemon_cwd(self) -> str | None:
        return str(self.code_tree) if self.code_tree is not None else None

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    @property
    def trace_dir(self) -> Path | None:
        return None

    def daemons(self) -> dict[int, str]:
        raise NotImplementedError

    def scope(self) -> ChainScope:
        return ChainScope(daemons=self.daemons(), dirs=(str(self.base),),
                          cgroup_parent=self.cgroup_parent)

    async def start(self) -> None:
        raise NotImplementedError

    async def _stop_daemons(self) -> list[str]:
        raise NotImplementedError

    async def stop(self, keep_logs: Path | None = None) -> list[str]:
        """Stop daemons, collect their spans (into `.spans`) and logs, then force-clean what
        survived; returns what had to be forced (empty when the CRI teardown was complete)."""
        forced = await self._stop_daemons()
        td = self.trace_dir
        if td is not None and td.is_dir():
            self.spans = read_spans(td)
        if keep_logs is not None and self.base.exists():
            logs = sorted(self.base.glob("*.log"))
            if logs:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for f in logs:  # the tail is what explains a failure
                    (keep_logs / f.name).write_bytes(f.read_bytes()[-1_000_000:])
        forced += await asyncio.to_thread(self._force_clean)
        return forced

    def _force_clean(self) -> list[str]:
        forced: list[str] = []
        for p in find_processes(under=self.base):
            forced.append(f"process {p.pid} {os.path.basename(p.exe)}")
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        forced += [f"cgroup task {pid}" for pid in kill_cgroup_tasks(self.cgroup_parent)]
        deadline = time.monotonic() + 5.0
        while find_processes(under=self.base) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.base.exists():
            mounts = mounts_below(self.base)
            forced += [f"mount {m}" for m in mounts]
            remove_tree(self.base)
        forced += [f"cgroup {d} (busy)" for d in remove_cgroups(self.cgroup_parent)]
        return forced

    def leftovers(self) -> list[str]:
        out = [f"process {p.pid} {' '.join(p.cmdline)[:100]}"
               for p in find_processes(under=self.base)]
        out += [f"mount {m}" for m in mounts_below(self.base)] if self.base.exists() else []
        if self.base.exists():
            out.append(f"directory {self.base}")
        out += [f"cgroup {d}" for d in cgroup_dirs(self.cgroup_parent)]
        return out


async def wait_cri_ready(endpoint: str, sock: Path, proc: asyncio.subprocess.Process | None,
                         what: str, timeout_s: float = 30.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.returncode is not None:
            raise ChainError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        if sock.exists():
            client = CriClient(endpoint)
            try:
                await client.version(timeout=2.0)
                return
            except Exception as exc:
                last = exc
            finally:
                await client.close()
        await asyncio.sleep(0.05)
    raise ChainError(f"{what} not ready after {timeout_s}s ({last}): {_tail(log)}")


async def wait_socket(sock: Path, proc: asyncio.subprocess.Process, what: str,
                      timeout_s: float = 30.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise ChainError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        if sock.exists():
            return
        await asyncio.sleep(0.05)
    raise ChainError(f"{what} did not create {sock} within {timeout_s}s: {_tail(log)}")


def _tail(path: Path | None, n: int = 15) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


async def _terminate(proc: asyncio.subprocess.Process | None, registry: ProcessRegistry,
                     what: str, grace_s: float = 10.0) -> list[str]:
    if proc is None:
        return []
    forced: list[str] = []
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            forced.append(f"{what} pid {proc.pid} ignored SIGTERM (SIGKILL)")
            proc.kill()
            await proc.wait()
    registry.unregister(proc.pid)
    return forced


@dataclass
class ContainerdChain(Chain):
    peer: ContainerdPeer | None = None

    def __post_init__(self) -> None:
        self.peer = ContainerdPeer(self.base, registry=self.registry)

    @property
    def endpoint(self) -> str:
        assert self.peer is not None
        return self.peer.endpoint

    def daemons(self) -> dict[int, str]:
        pid = self.peer.pid if self.peer else None
        return {pid: "containerd"} if pid else {}

    async def start(self) -> None:
        assert self.peer is not None
        await self.peer.start()
        self.started = True

    async def _stop_daemons(self) -> list[str]:
        assert self.peer is not None
        return await self.peer.stop_daemon()

    def _force_clean(self) -> list[str]:
        assert self.peer is not None
        forced = self.peer.clean_now()  # shims, runc state, shim sockets, the directory
        return forced + super()._force_clean()

    def leftovers(self) -> list[str]:
        out = super().leftovers()
        if self.peer is not None:
            out += [x for x in self.peer.leftovers() if x not in out]
        return out


@dataclass
class EngineChain(Chain):
    """Our engine, alone (shim chain) or in front of our sandboxer (sandbox chain)."""

    schema: str = "current"
    flavor: str = "runc"
    boot: str = "restore"  # microvm flavor: restore | cold
    vm_pool: int = 0  # microvm sandbox chain: VMs kept ready (0: the sandboxer's env default)
    vm_pool_mode: str = "spawned"
    engine: asyncio.subprocess.Process | None = None
    sandboxer: asyncio.subprocess.Process | None = None
    _logs: list[object] = field(default_factory=list)

    @property
    def uses_sandboxer(self) -> bool:
        return self.name == "sandbox"

    @property
    def socket(self) -> Path:
        return self.base / "engine.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def sandboxer_socket(self) -> Path:
        return self.base / "sandboxer.sock"

    @property
    def trace_dir(self) -> Path:
        return self.base / "trace"

    def daemons(self) -> dict[int, str]:
        out: dict[int, str] = {}
        if self.engine is not None and self.engine.returncode is None:
            out[self.engine.pid] = "engine"
        if self.sandboxer is not None and self.sandboxer.returncode is None:
            out[self.sandboxer.pid] = "sandboxer"
        return out

    def engine_config(self) -> str:
        lines = [
            f"listen = {_toml(str(self.socket))}",
            f"state_dir = {_toml(str(self.base / 'engine'))}",
            f"trace_dir = {_toml(str(self.trace_dir))}",
            f"default_runtime = {_toml(self.handler)}",
            "",
        ]
        if self.flavor == "microvm":
            # A cold boot under TCG plus the guest agent's start-up can take seconds.
            lines.insert(-1, "call_timeout_s = 120")
        if self.uses_sandboxer:
            lines += ["[runtimes.sandbox]", 'controller = "sandboxer"',
                      f"address = {_toml(str(self.sandboxer_socket))}",
                      f"schema = {_toml(self.schema)}"]
        elif self.flavor == "microvm":
            from bench.vmshim.main import ensure_shim_binary
            lines += ["[runtimes.shim]", 'controller = "shim"',
                      f"shim_binary = {_toml(str(ensure_shim_binary()))}"]
        else:
            lines += ["[runtimes.shim]", 'controller = "shim"',
                      'shim_binary = "containerd-shim-runc-v2"']
        if self.flavor == "microvm":
            lines.append("vm = true")
        return "\n".join(lines) + "\n"

    def engine_env(self) -> dict[str, str] | None:
        """The engine's environment; its per-pod shims inherit it (VM choice, trace dir)."""
        env = self.daemon_env()
        if self.flavor != "microvm" or self.uses_sandboxer:
            return env
        env = dict(os.environ if env is None else env)
        env.update({"CHAINBENCH_VMSHIM_DIR": str(self.base / "vs"),
                    "CHAINBENCH_VM_BACKEND": "qemu", "CHAINBENCH_VM_BOOT": self.boot,
                    "CHAINBENCH_TRACE_DIR": str(self.trace_dir)})
        return env

    def _log(self, name: str) -> object:
        fh = open(self.base / f"{name}.log", "ab")
        self._logs.append(fh)
        return fh

    async def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        py = [sys.executable, "-m", "bench.cli"]
        if self.uses_sandboxer:
            sdir = self.base / SANDBOXER_SUBDIR
            sdir.mkdir(exist_ok=True)
            vm = ["--backend", "vm", "--vm-boot", self.boot] if self.flavor == "microvm" else []
            if vm and self.vm_pool:
                vm += ["--vm-pool", str(self.vm_pool), "--vm-pool-mode", self.vm_pool_mode]
            self.sandboxer = await self.registry.spawn(
                *py, "sandboxer", "--listen", str(self.sandboxer_socket), "--dir", str(sdir),
                "--schema", self.schema, "--trace-dir", str(self.trace_dir), *vm,
                role="sandboxer", label=self.name, stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log("sandboxer"), stderr=self._logs[-1], env=self.daemon_env(),
                cwd=self.daemon_cwd())
            # The vm backend finds (or, if the driver did not, makes) its snapshot first.
            await wait_socket(self.sandboxer_socket, self.sandboxer, "sandboxer",
                              timeout_s=300.0 if vm else 30.0,
                              log=self.base / "sandboxer.log")
        cfg = self.base / "engine.toml"
        cfg.write_text(self.engine_config())
        self.engine = await self.registry.spawn(
            *py, "engine", "--config", str(cfg), role="engine", label=self.name,
            stdin=asyncio.subprocess.DEVNULL, stdout=self._log("engine"), stderr=self._logs[-1],
            env=self.engine_env(), cwd=self.daemon_cwd())
        await wait_cri_ready(self.endpoint, self.socket, self.engine, "engine",
                             log=self.base / "engine.log")
        self.started = True

    async def _stop_daemons(self) -> list[str]:
        # Engine first: it may still talk to the sandboxer while shutting down.
        forced = await _terminate(self.engine, self.registry, "engine")
        forced += await _terminate(self.sandboxer, self.registry, "sandboxer")
        for fh in self._logs:
            fh.close()  # type: ignore[attr-defined]
        self._logs.clear()
        return forced


def chain_available(name: str) -> str:
    """'' when the chain's code is present in this tree, else why not."""
    import importlib.util

    need = {"shim": ["bench.engine.server"],
            "sandbox": ["bench.engine.server", "bench.sandboxer.server"],
            "containerd": []}[name]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"missing modules {missing}" if missing else ""


# Directory names under the run dir.  The sandboxer serves one task socket per sandbox at
# <dir>/<64-hex id>/task.sock, which must fit AF_UNIX's 107 bytes: hence the short names.
CHAIN_DIRS = {"shim": "shim", "sandbox": "sbx", "containerd": "ctd"}
SANDBOXER_SUBDIR = "s"
MAX_RUN_ROOT = 107 - len("/12345678/sbx/s/") - 64 - len("/task.sock")


MAX_VARIANTS = 10  # a variant's lane directory is CHAIN_DIRS[chain][:2] + one digit


def lane_dir(name: str, variant_index: int | None) -> str:
    """Directory name of a chain's lane: as long as CHAIN_DIRS' names (the AF_UNIX budget)."""
    if variant_index is None:
        return CHAIN_DIRS[name]
    if not 0 <= variant_index < MAX_VARIANTS:
        raise ValueError(f"at most {MAX_VARIANTS} variants")
    return f"{CHAIN_DIRS[name][:2]}{variant_index}"


def make_chain(name: str, run_base: Path, run_id: str, *, schema: str = "current",
               flavor: str = "runc", registry: ProcessRegistry | None = None,
               variant_index: int | None = None, code_tree: Path | None = None,
               extra_env: dict[str, str] | None = None, boot: str = "restore",
               vm_pool: int = 0, vm_pool_mode: str = "spawned") -> Chain:
    """One chain's processes; with `variant_index` a lane of an A/B session whose daemons run
    `code_tree` with `extra_env` (the shim, runc and containerd are system binaries)."""
    reg = registry or default_registry()
    d = lane_dir(name, variant_index)
    base = run_base / d
    cg = f"/chainbench-{run_id}/{name if variant_index is None else d}"
    env = dict(extra_env or {})
    if name == "containerd":
        return ContainerdChain(name=name, base=base, cgroup_parent=cg, registry=reg, handler="",
                               code_tree=code_tree, extra_env=env)
    if name in ("shim", "sandbox"):
        return EngineChain(name=name, base=base, cgroup_parent=cg, registry=reg, handler=name,
                           schema=schema, flavor=flavor, code_tree=code_tree, extra_env=env,
                           boot=boot, vm_pool=vm_pool, vm_pool_mode=vm_pool_mode)
    raise ValueError(f"unknown chain {name!r}")


def prepare_vm_assets(say: Callable[[str], None]) -> str:
    """Build (or find in the cache) the guest kernel, the initramfs and the template snapshot
    both microVM chains restore from; returns the snapshot's path.  Minutes the first time.
    Call it outside an event loop (it runs its own for the snapshot)."""
    from bench.vm import initramfs, kernel
    from bench.vmshim import qemu_adapter

    say("microvm: guest kernel (cached by config; a first build takes minutes)")
    kinfo = kernel.build(quiet=True)
    say(f"microvm: kernel {kinfo.path}")
    iinfo = initramfs.build()
    say(f"microvm: initramfs {iinfo.path}")
    config = qemu_adapter.vm_config()
    t = time.monotonic()
    snap = asyncio.run(qemu_adapter.ensure_snapshot(config))
    say(f"microvm: template snapshot {snap.path} ({snap.size >> 20} MB, "
        f"{time.monotonic() - t:.1f}s), accel {config.accel}")
    return str(snap.path)


def run_leftovers(run_base: Path, run_id: str) -> list[str]:
    """Everything of a whole bench run still on the machine (the run's acceptance check)."""
    out = [f"process {p.pid} {' '.join(p.cmdline)[:100]}" for p in find_processes(under=run_base)]
    out += [f"process {p.pid} in cgroup {' '.join(p.cmdline)[:80]}"
            for p in find_processes(cgroup_contains=f"/chainbench-{run_id}/")]
    if run_base.exists():
        out += [f"mount {m}" for m in mounts_below(run_base)]
        out.append(f"directory {run_base}")
    out += [f"cgroup {d}" for d in cgroup_dirs(f"/chainbench-{run_id}")]
    with open("/proc/self/mountinfo") as fh:
        for line in fh:  # bind-mounted namespace files (nsfs) included
            if run_id in line:
                out.append(f"mount {line.split()[4]}")
    try:
        with open("/proc/net/unix") as fh:  # a socket still bound, even if its file is gone
            for line in fh:
                if run_id in line:
                    out.append(f"socket {line.split()[-1]}")
    except OSError:
        pass
    return sorted(set(out))


def remove_run_base(run_base: Path, run_id: str) -> list[str]:
    """Final sweep after every chain stopped: the run dir and the run's cgroup parent."""
    forced: list[str] = []
    kill_cgroup_tasks(f"/chainbench-{run_id}")
    if run_base.exists():
        # The run dir's own tmpfs (bench.statefs) is the run's, not a leftover of a chain;
        # remove_tree unmounts it with the rest, so its files never touch the disk's journal.
        forced += [f"mount {m}" for m in mounts_below(run_base, include_self=False)]
        remove_tree(run_base)
    forced += [f"cgroup {d} (busy)" for d in remove_cgroups(f"/chainbench-{run_id}")]
    return forced
