"""Pods honour CRI's cgroup_parent, so a run can find every process of its pods by cgroup."""
from __future__ import annotations

import pytest

from bench.engine.errors import EngineError
from bench.engine.spec import pod_cgroup_path
from bench.rpc.pb import cri_v1_pb2 as cri


def _cfg(parent: str) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(cgroup_parent=parent))


def test_parent_is_used_and_default_kept():
    assert pod_cgroup_path(_cfg("/chainbench-ab12/shim"), "p1") == "/chainbench-ab12/shim/p1"
    assert pod_cgroup_path(_cfg("/a//b/"), "c") == "/a/b/c"
    assert pod_cgroup_path(cri.PodSandboxConfig(), "p1") is None


@pytest.mark.parametrize("bad", ["relative/x", "/a/../../etc", "/a/./b", "/" + "x" * 600])
def test_bad_parent_is_invalid_argument(bad):
    with pytest.raises(EngineError) as exc:
        pod_cgroup_path(_cfg(bad), "p1")
    assert exc.value.code.name == "INVALID_ARGUMENT"
