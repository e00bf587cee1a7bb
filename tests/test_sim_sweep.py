"""`chainbench sweep`: a grid of simulated scenarios, locally and on a real Dask cluster."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from reports.schema import load_runs
from sim.sweep import load_sweep, main

SWEEP = """
name = "t-sweep"
scenario = "runc-c10"
chains = ["shim", "sandbox"]
seeds = [1, 2]
[grid]
cores = [1, 4]
pods = [20]
"""


def _write(tmp_path: Path, text: str = SWEEP) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


def test_local_sweep_writes_one_run_per_point(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(_write(tmp_path)), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    index = json.loads((out / "sweep.json").read_text())
    assert len(index["points"]) == 4
    runs = load_runs([out])
    assert len(runs) == 8 and {r.meta.source for r in runs} == {"sim"}
    df = pd.read_parquet(out / "sweep.parquet")
    assert len(df) == 8 and set(df["cores"]) == {1, 4}
    # more cores, lower latency: the what-if actually reaches the model
    by = df.groupby(["chain", "cores"])["run_pod_p50_ms"].mean()
    assert by[("shim", 4)] < by[("shim", 1)]
    # same seed, same point -> same result as a rerun
    again = tmp_path / "again"
    assert main([str(_write(tmp_path)), "--out", str(again), "--workers", "1", "--quiet"]) == 0
    df2 = pd.read_parquet(again / "sweep.parquet")
    pd.testing.assert_series_equal(df["run_pod_p95_ms"], df2["run_pod_p95_ms"])


def test_dask_sweep_on_a_local_cluster(tmp_path):
    import distributed  # a declared dependency of sweeps: missing it must fail, not skip
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        rc = main([str(_write(tmp_path)), "--out", str(out), "--quiet",
                   "--scheduler", cluster.scheduler_address])
    assert rc == 0
    df = pd.read_parquet(out / "sweep.parquet")
    assert len(df) == 8 and (df["pods_per_s"] > 0).all()


@pytest.mark.parametrize("text,msg", [
    ('scenario = "runc-c10"\n[grid]\ncores = []\n', "non-empty"),
    ('[grid]\ncores = [1]\n', "scenario"),
    ('scenario = "runc-c10"\n[grid]\nbogus = [1]\n', "unknown keys"),
    ('scenario = "runc-c10"\n[grid]\nconcurrency = [0]\n', "concurrency"),
    ('scenario = "nope"\n[grid]\ncores = [1]\n', "not found"),
    ('scenario = "runc-c10"\nx = [\n', "invalid TOML"),
])
def test_bad_sweep_exits_2(tmp_path, capsys, text, msg):
    assert main([str(_write(tmp_path, text)), "--out", str(tmp_path / "o")]) == 2
    assert msg in capsys.readouterr().err


def test_unreachable_scheduler_exits_2(tmp_path, capsys):
    rc = main([str(_write(tmp_path)), "--out", str(tmp_path / "o"), "--quiet",
               "--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "2"])
    assert rc == 2
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_shipped_sweeps_parse():
    root = Path(__file__).resolve().parent.parent / "scenarios"
    files = sorted(root.glob("sweep-*.toml"))
    assert files
    for f in files:
        assert load_sweep(f).points("/tmp/x")
