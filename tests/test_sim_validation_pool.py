"""`chainbench validate` pools several held-out sessions of one scenario and shows their spread.

Pure logic: the "bench" sessions are simulated with the prior and relabelled `source: bench`
(test_sim_calibration's `_bench_like`), so the pooled figures can be checked against the sessions'
own pods."""
from __future__ import annotations

import json

import numpy as np
import pytest

from reports.schema import load_run
from sim.validation import main as validate_main
from test_sim_calibration import _bench_like


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    seq = _bench_like(root / "seq", "runc-seq", 21, pods=40)
    c10 = [_bench_like(root / f"c10-{i}", "runc-c10", 30 + i, pods=30) for i in range(3)]
    return seq, c10


def test_sessions_of_one_scenario_are_pooled(sessions, capsys):
    seq, c10 = sessions
    rc = validate_main(["--calibrate-on", str(seq), "--validate-on", *map(str, c10),
                        "--replications", "2", "--threshold", "10", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["passed"] is True
    by = {(s["chain"], s["metric"]): s for s in data["scores"]}
    assert len(data["scores"]) == 6  # 2 chains x 3 metrics, not x 3 sessions
    for chain in ("shim", "sandbox"):
        runs = [load_run(d / chain) for d in c10]
        lat = np.concatenate([(r.pods[(~r.pods["warmup"]) & (r.pods["outcome"] == "ok")]
                               ["latency_s"] * 1e3).to_numpy() for r in runs])
        p95 = by[(chain, "run_pod_p95_ms")]
        assert p95["sessions"] == 3
        assert p95["measured"] == pytest.approx(np.percentile(lat, 95), abs=1e-3)
        assert p95["spread"] is not None and p95["spread"] >= 0


def test_per_run_scores_each_bench_like(sessions, capsys):
    seq, c10 = sessions
    rc = validate_main(["--calibrate-on", str(seq), "--validate-on", *map(str, c10),
                        "--replications", "2", "--threshold", "10", "--per-run"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith(("shim", "sandbox"))]
    assert len(rows) == 18 and "spread" in out  # 3 sessions x 2 chains x 3 metrics


def test_calibration_pools_sessions_instead_of_keeping_the_last(sessions):
    """Several sequential sessions of one chain are fitted together: every session's pods
    count, none overwrites another (it did: the last session alone used to win)."""
    from sim.calibration import CalibrationError, calibrate
    from sim.vocabulary import CALL_RUN_POD

    seq, c10 = sessions
    both = calibrate([str(c10[0]), str(c10[1])], kind="empirical")
    alone = calibrate([str(c10[1])], kind="empirical")
    assert len(both.sources) == 4 and "2 sessions pooled" in both.chains["shim/runc"].provenance
    runs = [load_run(d / "shim") for d in c10[:2]]
    step = "task.create"
    pooled = np.concatenate([
        (r.spans[(r.spans["call"] == CALL_RUN_POD) & (r.spans["step"] == step)
                 & r.spans["pod"].isin(r.pods[(~r.pods["warmup"]) & (r.pods["outcome"] == "ok")]
                                       ["pod"])]
         .eval("end_ns - start_ns") / 1e9).to_numpy() for r in runs])
    fitted = {s.step: s for s in both.model("shim", "runc").steps(CALL_RUN_POD)}[step]
    lone = {s.step: s for s in alone.model("shim", "runc").steps(CALL_RUN_POD)}[step]
    assert fitted.dist.median() == pytest.approx(float(np.median(pooled)), rel=0.02)
    assert fitted.dist.quantiles_s != lone.dist.quantiles_s
    # sessions that ran different pods cannot be one sample
    other = _bench_like(seq.parent / "seq2", "runc-seq", 5, pods=10, containers_per_pod=2)
    with pytest.raises(CalibrationError, match="containers per pod"):
        calibrate([str(seq), str(other)])
