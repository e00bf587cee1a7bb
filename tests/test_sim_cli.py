"""`chainbench simulate`: run directories bench-alike, golden reproducibility, arrivals, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.schema import load_run, load_runs
from reports.summary import summarize, summarize_paths
from sim.cli_simulate import main
from sim.vocabulary import STEPS

SCEN = """
name = "t-small"
flavor = "{flavor}"
chains = ["shim", "sandbox", "containerd"]
pods = {pods}
concurrency = {conc}
containers_per_pod = 1
warmup_pods = 2
memory_at = {mem}
[sim]
{sim}
"""


def _scenario(tmp_path: Path, flavor: str = "runc", pods: int = 12, conc: int = 4,
              sim: str = "") -> Path:
    p = tmp_path / f"s-{flavor}-{pods}-{conc}.toml"
    mem = [0, pods // 3, 2 * pods // 3, pods]
    p.write_text(SCEN.format(flavor=flavor, pods=pods, conc=conc, sim=sim, mem=mem))
    return p


def test_simulate_writes_bench_alike_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(_scenario(tmp_path)), "--out", str(out), "--quiet"]) == 0
    runs = {r.meta.chain: r for r in load_runs([out])}
    assert set(runs) == {"shim", "sandbox"}  # containerd is bench-only: skipped, not faked
    for chain, run in runs.items():
        assert run.meta.source == "sim" and run.path == out / chain
        assert len(run.pods) == 12 and run.pods["warmup"].sum() == 2
        assert (run.pods["latency_s"] > 0).all() and (run.pods["stop_remove_s"] > 0).all()
        assert set(run.spans["step"]) <= STEPS
        assert sorted(run.memory["pods_alive"].unique()) == [0, 4, 8, 12]
        s = summarize(run)
        assert s["run_pod_sandbox_ms"]["p50"] > 0 and s["pods_per_s"] > 0
        assert "engine.commit" in s["steps_ms"]
        assert s["create_start_container_ms"]["p50"] > 0
    shim, sandbox = summarize(runs["shim"]), summarize(runs["sandbox"])
    # a shim + pause per pod vs the sandboxer's small growth
    assert shim["mgmt_procs_per_pod"] == pytest.approx(2.0, abs=0.3)
    assert shim["mgmt_pss_mb_per_pod"] > 5 * sandbox["mgmt_pss_mb_per_pod"]
    assert "t-small" in json.dumps(summarize_paths([str(out)]))


def test_seeded_runs_reproduce_exactly(tmp_path):
    scen = str(_scenario(tmp_path))
    for name in ("a", "b"):
        assert main([scen, "--out", str(tmp_path / name), "--quiet", "--seed", "3"]) == 0
    assert main([scen, "--out", str(tmp_path / "c"), "--quiet", "--seed", "4"]) == 0
    for table in ("pods", "spans", "memory", "cpu"):
        a = pd.read_parquet(tmp_path / "a" / "shim" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "b" / "shim" / f"{table}.parquet")
        pd.testing.assert_frame_equal(a, b)
    a = pd.read_parquet(tmp_path / "a" / "shim" / "spans.parquet")
    c = pd.read_parquet(tmp_path / "c" / "shim" / "spans.parquet")
    assert not a["end_ns"].equals(c["end_ns"])


def test_naive_engine_gives_the_same_run(tmp_path):
    scen = str(_scenario(tmp_path, pods=10, conc=3))
    assert main([scen, "--out", str(tmp_path / "f"), "--quiet"]) == 0
    assert main([scen, "--out", str(tmp_path / "n"), "--quiet", "--engine", "naive"]) == 0
    for chain in ("shim", "sandbox"):
        f = load_run(tmp_path / "f" / chain)
        n = load_run(tmp_path / "n" / chain)
        pd.testing.assert_frame_equal(f.spans, n.spans)
        pd.testing.assert_frame_equal(f.pods, n.pods)
    # the shipped calibration's off-path CPU (the shim chain's pause process) is in the run's
    # cpu table under its own role, once per pod
    from sim.calibration import load_calibration

    off = sum(s.offpath for c in load_calibration().model("shim", "runc").calls.values()
              for s in c)
    cpu = load_run(tmp_path / "f" / "shim").cpu
    assert off > 0
    assert cpu.loc[cpu["role"] == "pause", "cpu_s"].sum() == pytest.approx(off * 10, rel=1e-6)
    assert "pause" not in set(load_run(tmp_path / "f" / "sandbox").cpu["role"])


def test_microvm_memory_and_what_if(tmp_path):
    scen = str(_scenario(tmp_path, flavor="microvm", pods=8, conc=2))
    assert main([scen, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main([scen, "--out", str(tmp_path / "b"), "--quiet", "--set", "vm_restore_ms=20",
                 "--set", "vmm_pss_mb=50"]) == 0
    a = summarize(load_run(tmp_path / "a" / "sandbox"))
    b = summarize(load_run(tmp_path / "b" / "sandbox"))
    assert a["vmm_pss_mb_per_pod"] == pytest.approx(77.0, rel=0.15)
    assert b["vmm_pss_mb_per_pod"] == pytest.approx(50.0, rel=0.15)
    assert b["run_pod_sandbox_ms"]["p50"] < a["run_pod_sandbox_ms"]["p50"]


def test_cluster_poisson_and_trace_arrivals(tmp_path):
    scen = _scenario(tmp_path, pods=20, conc=20,
                     sim='nodes = 5\narrival = "poisson"\nrate = 200.0\nplacement = "random"')
    assert main([str(scen), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    run = load_run(tmp_path / "p" / "shim")
    assert len(run.pods) == 100 and run.pods["node"].nunique() == 5
    gaps = np.diff(np.sort(run.pods["submit_s"].to_numpy()))
    assert 1 / 400 < gaps.mean() < 1 / 100  # ~200 pods/s arriving
    trace = tmp_path / "trace.csv"
    pd.DataFrame({"submit_s": [0.0, 0.01, 0.02, 0.5, 0.5, 0.9]}).to_csv(trace, index=False)
    scen = _scenario(tmp_path, pods=3, conc=1, sim=f'nodes = 2\narrival = "trace"\n'
                                                   f'trace = "{trace}"')
    assert main([str(scen), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    run = load_run(tmp_path / "t" / "sandbox")
    assert sorted(run.pods["submit_s"].round(6)) == [0.0, 0.01, 0.02, 0.5, 0.5, 0.9]


def test_sketch_mode_keeps_histograms_not_rows(tmp_path):
    scen = _scenario(tmp_path, pods=50, conc=50,
                     sim='nodes = 600\naggregate = "sketch"\nstop = false\ncores = 8')
    assert main([str(scen), "--out", str(tmp_path / "k"), "--quiet", "--chain", "sandbox"]) == 0
    run = load_run(tmp_path / "k" / "sandbox")
    assert run.meta.pods == 30_000 and len(run.pods) == 50  # node 0 as the sample
    agg = run.meta.extra["aggregate"]
    hist = pd.read_parquet(tmp_path / "k" / "sandbox" / "histograms.parquet")
    rp = hist[hist["metric"] == "run_pod_sandbox"]
    assert rp["count"].sum() == 30_000 - 600 * 2  # warm-up pods excluded
    # node 0's exact percentile is close to the cluster sketch's (same distribution)
    node0 = summarize(run)["run_pod_sandbox_ms"]["p50"]
    assert agg["run_pod_sandbox_ms"]["p50"] == pytest.approx(node0, rel=0.3)


@pytest.mark.parametrize("args,msg", [
    (["no-such-scenario"], "not found"),
    (["{scen}", "--set", "nodes=0"], "nodes"),
    (["{scen}", "--set", "bogus=1"], "unknown keys"),
    (["{scen}", "--chain", "nope"], "not in the scenario"),
    (["{scen}", "--calibration", "/nonexistent.json"], "not found"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, msg):
    scen = str(_scenario(tmp_path))
    argv = [a.format(scen=scen) for a in args] + ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_console_entry_routes_simulate(tmp_path):
    out = tmp_path / "o"
    exe = Path(sys.executable).parent / "chainbench"
    res = subprocess.run([str(exe), "simulate", "runc-seq", "--out", str(out), "--chain", "shim"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pods/s" in res.stderr  # progress goes to stderr
    assert (out / "shim" / "run.json").is_file()
    res = subprocess.run([str(exe), "summary", str(out), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert json.loads(res.stdout)["runs"][0]["source"] == "sim"


def test_memory_ledger_balances(tmp_path):
    assert main([str(_scenario(tmp_path)), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    led = pd.read_parquet(tmp_path / "o" / "shim" / "ledger.parquet")
    assert list(led["t_s"]) == sorted(led["t_s"])
    peak = led.groupby("role")["procs_total"].max()
    assert peak["shim"] == 12 and peak["pause"] == 12  # one of each per pod at the peak
    last = led.groupby("role").tail(1)
    assert (last["pss_total"] == 0).all() and (last["procs_total"] == 0).all()
    # the last pod is alive once it is ready, after its shim and pause appeared
    assert led["pods_alive"].max() == 11 and led["pods_alive"].iloc[-1] == 0


def test_large_runs_simulate_chains_in_parallel_with_the_same_result(tmp_path, monkeypatch):
    """The command line runs a large scenario's chains one process each; the runs equal the
    serial ones bit for bit (each chain has its own random streams)."""
    from sim import cli_simulate
    from sim.calibration import load_calibration

    scen = _scenario(tmp_path, pods=20, conc=20, sim='nodes = 30\naggregate = "rows"')
    monkeypatch.setattr(cli_simulate, "PARALLEL_MIN_PODS", 0)
    sc = cli_simulate.load_scenario(str(scen))
    st = cli_simulate.settings_for(sc)
    cal = load_calibration()
    args = [(sc, st, cal, c, tmp_path, None) for c in ("shim", "sandbox")]
    assert cli_simulate._chain_workers(sc, st, args) == 2  # CI and dev machines: >= 2 cores
    with_lambda = [(*a[:5], lambda msg: None) for a in args]
    assert cli_simulate._chain_workers(sc, st, with_lambda) == 1  # not picklable: serial
    par = cli_simulate.simulate_scenario(sc, st, tmp_path / "par", progress=None, parallel=True)
    ser = cli_simulate.simulate_scenario(sc, st, tmp_path / "ser", progress=None)
    assert [p.name for p in par] == [p.name for p in ser] == ["shim", "sandbox"]
    for p, q in zip(par, ser):
        for table in ("pods", "spans", "memory", "cpu"):
            pd.testing.assert_frame_equal(pd.read_parquet(p / f"{table}.parquet"),
                                          pd.read_parquet(q / f"{table}.parquet"))
