"""Pure logic of the load driver: argument handling, block plan, chain rotation."""
from __future__ import annotations

import pytest

from bench import loaddriver
from scenarios.loader import ScenarioError


def _bench(argv):
    return loaddriver.Bench(loaddriver.parse_args(argv))


def test_blocks_never_cross_memory_points(tmp_path):
    b = _bench(["runc-seq", "--chain", "containerd", "--out", str(tmp_path), "--block", "3"])
    plan = b.blocks()
    flat = [i for idx, _ in plan for i in idx]
    assert flat == list(range(b.sc.pods))
    ends = {idx[-1] + 1 for idx, sample in plan if sample}
    assert ends == set(b.sc.memory_points()) - {0}
    for idx, _ in plan:
        assert 1 <= len(idx) <= 3
        lo, hi = idx[0], idx[-1] + 1
        assert not any(lo < p < hi for p in b.sc.memory_points())


def test_pods_override_keeps_points_within_range(tmp_path):
    o = loaddriver.parse_args(["runc-seq", "--chain", "containerd", "--out", str(tmp_path),
                               "--pods", "7", "--concurrency", "3"])
    assert o.scenario.pods == 7 and o.scenario.concurrency == 3
    assert max(o.scenario.memory_points()) == 7
    assert o.scenario.warmup_pods < 7
    assert o.block == 5  # max(concurrency, 5)


def test_rotation_changes_who_goes_first(tmp_path):
    b = _bench(["runc-seq", "--chain", "containerd", "--out", str(tmp_path)])
    from bench.cri_client import CriClient
    for name in ("a", "b", "c"):
        b.loads[name] = loaddriver.ChainLoad(chain=None, client=CriClient("/x"), pods=[])  # type: ignore[arg-type]
    firsts = [next(iter(b.order(k))) for k in range(3)]
    assert len({id(f) for f in firsts}) == 3


@pytest.mark.parametrize("argv, msg", [
    (["runc-seq", "--chain", "nope"], "unknown chains"),
    (["runc-seq", "--chain", "containerd,containerd"], "twice"),
    (["runc-seq", "--chain", "containerd", "--pods", "0"], "--pods"),
    (["runc-c10", "--chain", "containerd", "--block", "4"], "below the concurrency"),
    (["no-such-scenario", "--chain", "containerd"], "not found"),
])
def test_bad_arguments_are_clear_errors(tmp_path, argv, msg):
    with pytest.raises(ScenarioError, match=msg):
        loaddriver.parse_args(argv + ["--out", str(tmp_path)])
    assert loaddriver.main(argv + ["--out", str(tmp_path)]) == 2


def test_rpc_is_routed_to_rpcbench(monkeypatch):
    import bench.rpcbench as rpcbench
    seen = []
    monkeypatch.setattr(rpcbench, "main", lambda argv: seen.append(argv) or 0)
    assert loaddriver.main(["rpc", "--n", "3"]) == 0
    assert seen == [["--n", "3"]]


def test_a_pod_lifetime_is_refused_not_ignored(tmp_path):
    """bench stops pods after the ramp: a scenario asking for pods that stop while others
    start (lifetime_s > 0) is an error, not a run that silently did something else."""
    sc = tmp_path / "churn.toml"
    sc.write_text('name = "churn"\npods = 2\nlifetime_s = 30\n')
    with pytest.raises(ScenarioError, match="lifetime_s"):
        loaddriver.parse_args([str(sc), "--chain", "containerd", "--out", str(tmp_path / "o")])
    assert loaddriver.main([str(sc), "--chain", "containerd", "--out", str(tmp_path / "o")]) == 2
