"""Tests of the regression gate: an injected 30% slowdown fails it, no change passes it, and bad
input exits 2 with a message (synthetic runs from tests/runfixtures.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reports import gate
from reports.schema import load_runs
from runfixtures import make_run, make_session

CHAINS = ("shim", "sandbox", "containerd")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    return {
        "base": make_session(root / "base", chains=CHAINS, seed=1),
        "same": make_session(root / "same", chains=CHAINS, seed=2),
        "slow": make_session(root / "slow", chains=CHAINS, seed=3, slowdown=1.3),
    }


def test_gate_fails_on_injected_30_percent_slowdown(dirs: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = gate.main(["--baseline", str(dirs["base"]), "--candidate", str(dirs["slow"])])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.startswith("## Gate: FAIL")
    for chain in CHAINS:
        assert f"| {chain} | runc | runc-c4 | run_pod_sandbox |" in out
    reg_lines = [ln for ln in out.splitlines() if "**REGRESSION**" in ln]
    assert any("| shim | runc | runc-c4 | run_pod_sandbox |" in ln for ln in reg_lines)
    assert any("| sandbox | runc | runc-c4 | run_pod_sandbox |" in ln for ln in reg_lines)


def test_gate_passes_without_change(dirs: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = gate.main(["--baseline", str(dirs["base"]), "--candidate", str(dirs["same"])])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("## Gate: PASS — 0 regression(s)")
    assert "REGRESSION" not in out


def test_gate_false_alarms_stay_rare_across_seeds(tmp_path: Path) -> None:
    """Holm across ~20 tests per gate keeps a no-change gate green (seeded repetitions)."""
    failures = 0
    for seed in range(6):
        base = load_runs([make_session(tmp_path / f"b{seed}", seed=100 + seed)])
        cand = load_runs([make_session(tmp_path / f"c{seed}", seed=200 + seed)])
        res = gate.compare_runs(base, cand, gate.GateConfig(n_perm=2000, seed=seed))
        assert any(c.p_value is not None for c in res.comparisons)
        failures += not res.passed
    assert failures <= 1


def test_compare_runs_api_and_json(dirs: dict[str, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    res = gate.compare_runs(load_runs([dirs["slow"]]), load_runs([dirs["base"]]),
                            gate.GateConfig(n_perm=2000))
    assert res.passed and res.exit_code == 0
    rp = [c for c in res.comparisons if c.metric == "run_pod_sandbox"]
    assert {c.chain for c in rp} == set(CHAINS)
    assert all(c.status == "improvement" and c.change < -0.1 for c in rp)
    assert all(c.p_adjusted is not None and c.p_adjusted >= c.p_value for c in rp)
    steps = {c.metric for c in res.comparisons if c.chain == "shim"}
    assert {"step:task.create", "step:shim.spawn", "mgmt_pss_mb_per_pod", "error_rate"} <= steps

    rc = gate.main(["--baseline", str(dirs["base"]), "--candidate", str(dirs["slow"]), "--json",
                    "--permutations", "2000"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["passed"] is False and doc["regressions"] > 0
    assert doc["config"]["alpha"] == 0.01


def test_floors_and_metric_selection(dirs: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--baseline", str(dirs["base"]), "--candidate", str(dirs["slow"]),
            "--permutations", "2000", "--metrics", "run_pod_sandbox"]
    # A 30% slowdown is significant but below a 50% floor: no regression.
    assert gate.main(args + ["--metric-floor", "run_pod_sandbox=0.5"]) == 0
    assert "significant, within floor" in capsys.readouterr().out
    assert gate.main(args + ["--noise-floor", "0.1"]) == 1
    capsys.readouterr()


def test_single_step_slowdown_is_localised(tmp_path: Path) -> None:
    base = make_session(tmp_path / "b", seed=7)
    cand = tmp_path / "c"
    make_run(cand / "shim", chain="shim", seed=8, step_slowdown={"task.create": 1.6})
    make_run(cand / "sandbox", chain="sandbox", seed=9)
    res = gate.compare_runs(load_runs([base]), load_runs([cand]), gate.GateConfig(n_perm=5000))
    regressed = {(c.chain, c.metric) for c in res.regressions}
    assert ("shim", "step:task.create") in regressed
    assert not any(chain == "sandbox" for chain, _ in regressed)
    assert not any(m in ("step:shim.spawn", "step:task.start") for _, m in regressed)


def test_error_rate_and_sanity_band(tmp_path: Path) -> None:
    make_run(tmp_path / "b" / "shim", chain="shim", seed=1)
    make_run(tmp_path / "c" / "shim", chain="shim", seed=2, errors=8)
    res = gate.compare_runs(load_runs([tmp_path / "b"]), load_runs([tmp_path / "c"]),
                            gate.GateConfig(n_perm=1000))
    err = next(c for c in res.comparisons if c.metric == "error_rate")
    assert err.status == "regression" and err.change == pytest.approx(8 / 37)
    band = gate.GateConfig(n_perm=1000, bands={"run_pod_sandbox": 1.0}, error_rate_floor=1.0)
    res = gate.compare_runs(load_runs([tmp_path / "b"]), load_runs([tmp_path / "b"]), band)
    rp = next(c for c in res.comparisons if c.metric == "run_pod_sandbox")
    assert rp.status == "regression" and "sanity band" in rp.note


@pytest.mark.parametrize("extra, message", [
    (["--metric-floor", "run_pod_sandbox"], "METRIC=NUMBER"),
    (["--metric-floor", "run_pod_sandbox=-1"], ">= 0"),
    (["--metric-floor", "no_such_metric=0.1"], "matches no metric"),
    (["--band", "nope*=5"], "matches no metric"),
    (["--alpha", "2"], "alpha"),
    (["--noise-floor", "nan"], "noise-floor"),
])
def test_bad_options_exit_2(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                            extra: list[str], message: str) -> None:
    rc = gate.main(["--baseline", str(dirs["base"]), "--candidate", str(dirs["same"]),
                    "--permutations", "200"] + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("chainbench gate: ") and message in err


def test_bad_inputs_exit_2(dirs: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert gate.main(["--baseline", str(tmp_path / "missing"), "--candidate",
                      str(dirs["same"])]) == 2
    assert "no such directory" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert gate.main(["--baseline", str(empty), "--candidate", str(dirs["same"])]) == 2
    assert "no run.json" in capsys.readouterr().err

    other = make_run(tmp_path / "other" / "shim", chain="shim", scenario="runc-seq", seed=1)
    assert gate.main(["--baseline", str(dirs["base"]), "--candidate", str(other)]) == 2
    assert "no candidate run matches" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    assert gate.main(["--baseline", str(broken), "--candidate", str(dirs["same"])]) == 2
    assert "invalid JSON" in capsys.readouterr().err

    assert gate.main(["--baseline", str(dirs["base"])]) == 2  # argparse: --candidate missing
    assert "--candidate" in capsys.readouterr().err


def test_mixed_sources_are_refused(tmp_path: Path) -> None:
    make_run(tmp_path / "b" / "bench", chain="shim", source="bench", seed=1)
    make_run(tmp_path / "b" / "sim", chain="shim", source="sim", seed=2)
    make_run(tmp_path / "c" / "shim", chain="shim", seed=3)
    with pytest.raises(gate.GateInputError, match="mix sources"):
        gate.compare_runs(load_runs([tmp_path / "b"]), load_runs([tmp_path / "c"]))
