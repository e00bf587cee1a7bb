"""`chainbench validate` pools several held-out sessions of one scenario and shows their spread.

Pure logic: the "bench" sessions are simulated with the prior and relabelled `source: bench`
(as in test_sim_calibration), so the pooled figures can be checked against the sessions'
own pods."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from reports.schema import load_run
from scenarios.loader import load_scenario
from sim.calibration import prior_calibration
from sim.cli_simulate import settings_for, simulate_scenario
from sim.validation import main as validate_main


def _session(out: Path, scenario: str, seed: int, **overrides) -> Path:
    sc = replace(load_scenario(scenario), **overrides)
    for p in simulate_scenario(sc, settings_for(sc, {"seed": seed}), out, progress=None,
                               cal=prior_calibration()):
        meta = json.loads((p / "run.json").read_text())
        meta["source"] = "bench"
        (p / "run.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    seq = _session(root / "seq", "runc-seq", 21, pods=40)
    c10 = [_session(root / f"c10-{i}", "runc-c10", 30 + i, pods=30) for i in range(3)]
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


def test_per_run_scores_each_session(sessions, capsys):
    seq, c10 = sessions
    rc = validate_main(["--calibrate-on", str(seq), "--validate-on", *map(str, c10),
                        "--replications", "2", "--threshold", "10", "--per-run"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith(("shim", "sandbox"))]
    assert len(rows) == 18 and "spread" in out  # 3 sessions x 2 chains x 3 metrics
