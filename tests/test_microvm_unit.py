"""Pure logic of the microVM wiring: the engine's `vm` runtime key, what the sandbox chain's
Task.Create carries for a guest, the chains' engine config/environment for the microvm flavor,
the probes' roles for our VM shim and QEMU, and the sandboxer's per-sandbox choice."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.chains import make_chain
from bench.engine.config import ConfigError, parse_config
from bench.engine.controller import ContainerRun
from bench.engine.sandbox import Container
from bench.engine.sandboxer_controller import PROCESS_TYPE_URL, SandboxerController
from bench.probes import ChainScope, ProcInfo, classify, scope_processes
from bench.sandboxer import vms
from bench.tracing import Tracer


def _cfg(vm: object) -> dict:
    return {"listen": "/x/e.sock", "state_dir": "/x/s",
            "runtimes": {"sb": {"controller": "sandboxer", "address": "/x/sb.sock", "vm": vm}}}


def test_engine_vm_key():
    assert parse_config(_cfg(True)).runtimes["sb"].vm is True
    assert parse_config({**_cfg(False)}).runtimes["sb"].vm is False
    with pytest.raises(ConfigError, match="vm must be true or false"):
        parse_config(_cfg("yes"))


def _controller(vm: bool) -> SandboxerController:
    cfg = parse_config(_cfg(vm))
    return SandboxerController(cfg, cfg.runtimes["sb"], store=None, tracer=Tracer(None, "e"))


def _run() -> ContainerRun:
    spec = {"process": {"args": ["/bin/sleep", "3600"], "cwd": "/", "env": ["A=1"]},
            "root": {"path": "/host/rootfs"}}
    return ContainerRun(container=Container.__new__(Container), spec=spec)


def test_sandbox_chain_sends_the_process_to_a_guest_only():
    assert _controller(False)._create_options(_run()) is None
    opts = _controller(True)._create_options(_run())
    assert opts.type_url == PROCESS_TYPE_URL
    assert json.loads(opts.value) == {"args": ["/bin/sleep", "3600"], "cwd": "/", "env": ["A=1"]}


def test_microvm_engine_config_and_env(tmp_path):
    shim = make_chain("shim", tmp_path, "r1", flavor="microvm", boot="cold")
    text = shim.engine_config()
    assert "vm = true" in text and "containerd-shim-chainbench-vm-v2" in text
    assert "call_timeout_s = 120" in text.split("[runtimes")[0]  # a top-level key
    env = shim.engine_env()
    assert env["CHAINBENCH_VM_BOOT"] == "cold" and env["CHAINBENCH_VM_BACKEND"] == "qemu"
    assert env["CHAINBENCH_TRACE_DIR"] == str(shim.trace_dir)
    assert env["CHAINBENCH_VMSHIM_DIR"].startswith(str(tmp_path))
    sbx = make_chain("sandbox", tmp_path, "r1", flavor="microvm")
    assert "vm = true" in sbx.engine_config() and sbx.engine_env() is None
    runc = make_chain("shim", tmp_path, "r1")
    assert "vm = true" not in runc.engine_config() and runc.engine_env() is None


def _proc(pid: int, ppid: int, argv: tuple[str, ...], exe: str, cwd: str = "/") -> ProcInfo:
    return ProcInfo(pid=pid, ppid=ppid, comm=exe[:15], exe=exe, argv=argv, cwd=cwd, cgroup="/")


def test_probes_find_our_vm_shim_and_its_qemu():
    shim = _proc(10, 1, ("/v/bin/python3", "-m", "bench.vmshim", "-namespace", "n", "-id", "p"),
                 "python3.11", cwd="/run/cb/r1/shim/engine/p")
    qemu = _proc(11, 10, ("qemu-system-x86_64", "-M", "microvm"), "qemu-system-x86_64")
    other = _proc(12, 1, ("/v/bin/python3", "-m", "bench.vmshim"), "python3.11", cwd="/else")
    scope = ChainScope(daemons={}, dirs=("/run/cb/r1/shim",))
    table = {p.pid: p for p in (shim, qemu, other)}
    got = {pid: role for pid, (_, role) in scope_processes(scope, table).items()}
    assert got == {10: "shim", 11: "vmm"}
    assert classify(qemu, scope) == "vmm"


def test_sandboxer_per_sandbox_choice():
    assert vms.pick({}, vms.ANNOTATION_BOOT, "restore", vms.BOOT_MODES) == "restore"
    assert vms.pick({vms.ANNOTATION_BOOT: "cold"}, vms.ANNOTATION_BOOT, "restore",
                    vms.BOOT_MODES) == "cold"
    with pytest.raises(ValueError, match="want one of"):
        vms.pick({vms.ANNOTATION_BACKEND: "kata"}, vms.ANNOTATION_BACKEND, "runc", vms.BACKENDS)


def test_sandbox_record_round_trips_the_vm_fields(tmp_path: Path):
    from bench.sandboxer.state import Sandbox
    sb = Sandbox(id="s1", dir=str(tmp_path), backend="vm", boot="cold",
                 vm={"id": "s1", "pid": 5, "start_ticks": 9, "workdir": str(tmp_path)})
    sb.save()
    back = Sandbox.from_json(json.loads((tmp_path / "sandbox.json").read_text()))
    assert (back.backend, back.boot, back.vm) == ("vm", "cold", sb.vm)
    assert back.agent_socket == str(tmp_path / "agent.sock")
    old = {k: v for k, v in sb.to_json().items() if k not in ("backend", "boot", "vm")}
    assert Sandbox.from_json(old).backend == "runc"  # records of older sandboxers
