"""Pure logic of the microVM shim: Go-style flags, VM backend/boot selection, socket paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.vmshim import launch
from bench.vmshim.main import Flags, UsageError, parse_flags
from bench.vmshim.vm import VmConfigError, resolve_options


def test_flags_as_containerd_passes_them():
    f = parse_flags(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary",
                     "/usr/bin/containerd", "-id", "p1", "-debug", "start"])
    assert f == Flags(namespace="k8s.io", address="/run/c.sock",
                      publish_binary="/usr/bin/containerd", id="p1", debug=True, action="start")
    f = parse_flags(["--namespace=n", "-id=p2", "-bundle", "/b", "-debug=false", "delete"])
    assert (f.namespace, f.id, f.bundle, f.debug, f.action) == ("n", "p2", "/b", False, "delete")
    assert parse_flags(["-namespace", "n", "-id", "x"]).action == ""  # the daemon


@pytest.mark.parametrize("argv, msg", [
    (["-nope", "x", "start"], "not defined: -nope"),
    (["-id"], "needs an argument"),
    (["-id", "x", "launch"], "unknown action"),
    (["-id", "x", "start", "extra"], "unexpected arguments"),
])
def test_bad_flags(argv, msg):
    with pytest.raises(UsageError, match=msg):
        parse_flags(argv)


def _bundle(tmp_path, annotations=None, vm_json=None):
    (tmp_path / "config.json").write_text(json.dumps({"annotations": annotations or {}}))
    if vm_json is not None:
        (tmp_path / "vm.json").write_text(json.dumps(vm_json))
    return tmp_path


def test_vm_options_precedence(tmp_path):
    assert (resolve_options(_bundle(tmp_path), env={}).backend,
            resolve_options(tmp_path, env={}).boot) == ("qemu", "restore")
    env = {"CHAINBENCH_VM_BACKEND": "host", "CHAINBENCH_VM_BOOT": "cold"}
    o = resolve_options(tmp_path, env=env)
    assert (o.backend, o.boot) == ("host", "cold")
    _bundle(tmp_path, vm_json={"boot": "restore", "memory_mb": 256, "agent_timeout_s": 5})
    o = resolve_options(tmp_path, env=env)
    assert (o.backend, o.boot, o.agent_timeout_s, o.extra) == ("host", "restore", 5.0,
                                                               {"memory_mb": 256})
    _bundle(tmp_path, annotations={"io.chainbench.vm.boot": "cold",
                                   "io.chainbench.vm.backend": "qemu"}, vm_json={"boot": "restore"})
    o = resolve_options(tmp_path, env=env)
    assert (o.backend, o.boot) == ("qemu", "cold")


@pytest.mark.parametrize("annotations, vm_json, msg", [
    ({"io.chainbench.vm.backend": "xen"}, None, "unknown VM backend"),
    ({"io.chainbench.vm.boot": "warm"}, None, "unknown VM boot mode"),
    ({}, {"agent_timeout_s": -1}, "agent_timeout_s"),
    ({}, ["not", "an", "object"], "JSON object"),
])
def test_vm_options_rejects(tmp_path, annotations, vm_json, msg):
    _bundle(tmp_path, annotations, vm_json)
    with pytest.raises(VmConfigError, match=msg):
        resolve_options(tmp_path, env={})


def test_socket_path_is_stable_short_and_bounded():
    root = Path("/run/cb")
    a = launch.socket_path("/run/engine.sock", "ns", "p1", root)
    assert a == launch.socket_path("/run/engine.sock", "ns", "p1", root)
    assert a != launch.socket_path("/run/engine.sock", "ns", "p2", root)
    assert a.startswith("/run/cb/s/") and len(a.rsplit("/", 1)[1]) == 64
    with pytest.raises(launch.ShimFailure, match="longer than"):
        launch.socket_path("/a", "ns", "p1", root / ("x" * 40))


def test_vm_options_tolerate_odd_specs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"annotations": ["not", "a", "map"]}))
    assert resolve_options(tmp_path, env={}).backend == "qemu"
    (tmp_path / "config.json").write_text("{not json")
    assert resolve_options(tmp_path, env={"CHAINBENCH_VM_BOOT": "cold"}).boot == "cold"
