"""Pure-logic tests of the OCI spec builder (bench/runtimes/oci.py)."""
from __future__ import annotations

import json

import pytest

from bench.runtimes import oci


def _ns(spec):
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def test_pause_host_network_has_no_uts_net_or_hostname():
    s = oci.pause_spec("/r", "pod1", hostname="ignored")
    assert s["process"]["args"] == ["/pause"]
    assert s["root"] == {"path": "/r", "readonly": True}
    assert "hostname" not in s
    assert set(_ns(s)) == {"ipc", "pid", "mount"}
    assert all(p is None for p in _ns(s).values())
    assert s["linux"]["cgroupsPath"] == "/chainbench/pod1"
    assert "oomScoreAdj" not in s["process"]


def test_pause_own_network_gets_uts_and_hostname():
    s = oci.pause_spec("/r", "pod1", host_network=False, hostname="h1")
    assert s["hostname"] == "h1"
    assert {"uts", "network"} <= set(_ns(s))


def test_container_joins_pod_namespaces():
    join = oci.join_pod_namespaces(1234)
    assert join == {"ipc": "/proc/1234/ns/ipc"}
    s = oci.container_spec("/r", "c1", ["sleep", "1"], join=join, hostname="x")
    ns = _ns(s)
    assert ns["ipc"] == "/proc/1234/ns/ipc"
    assert ns["mount"] is None and ns["pid"] is None
    assert "hostname" not in s  # no uts joined
    dests = [m["destination"] for m in s["mounts"]]
    assert "/tmp" in dests and "/proc" in dests
    shared = oci.join_pod_namespaces(7, host_network=False, share_pid=True)
    assert shared == {"ipc": "/proc/7/ns/ipc", "uts": "/proc/7/ns/uts",
                      "network": "/proc/7/ns/net", "pid": "/proc/7/ns/pid"}
    s2 = oci.container_spec("/r", "c2", ["true"], join=shared, hostname="h")
    assert s2["hostname"] == "h" and _ns(s2)["pid"] == "/proc/7/ns/pid"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 77, "-a", "a..b", "a b", None, "é"])
def test_bad_ids_rejected(bad):
    with pytest.raises(oci.SpecError):
        oci.validate_id(bad)
    with pytest.raises(oci.SpecError):
        oci.pause_spec("/r", bad)


def test_spec_errors():
    with pytest.raises(oci.SpecError, match="uts"):
        oci.build_spec(oci.SpecOptions(args=["x"], root="/r", hostname="h"))
    with pytest.raises(oci.SpecError, match="empty"):
        oci.build_spec(oci.SpecOptions(args=[], root="/r"))
    with pytest.raises(oci.SpecError, match="duplicate"):
        oci.build_spec(oci.SpecOptions(args=["x"], root="/r",
                                       namespaces=[oci.Namespace("pid"), oci.Namespace("pid")]))
    with pytest.raises(oci.SpecError, match="unknown namespace"):
        oci.build_spec(oci.SpecOptions(args=["x"], root="/r", namespaces=[oci.Namespace("foo")]))
    with pytest.raises(oci.SpecError, match="mount"):
        oci.container_spec("/r", "c", ["x"], join={"mount": "/proc/1/ns/mnt"})


def test_resources_and_write_bundle(tmp_path):
    s = oci.build_spec(oci.SpecOptions(args=["x"], root="/r", memory_limit=1 << 20,
                                       cpu_shares=512, pids_limit=10))
    r = s["linux"]["resources"]
    assert r["memory"] == {"limit": 1 << 20} and r["cpu"] == {"shares": 512}
    assert r["pids"] == {"limit": 10}
    b = oci.write_bundle(tmp_path / "b", s)
    assert json.loads((b / "config.json").read_text()) == s
    assert (b / "rootfs").is_dir()
    assert sorted(p.name for p in b.iterdir()) == ["config.json", "rootfs"]
