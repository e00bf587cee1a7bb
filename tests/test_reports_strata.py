"""The gate's stratified permutation test for A/B sessions: drift between interleaving blocks is
not a code effect, a real 30% shift still is; sub-millisecond steps are kept out by the absolute
floor.  Synthetic runs shaped like `chainbench bench --variant ...` output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reports import gate, stats
from reports.schema import RunMeta, load_runs, write_run
from sim.vocabulary import CALL_RUN_POD

# Machine state per block: a shared 2-core machine whose other jobs come and go.
DRIFT = (1.0, 2.2, 1.0, 1.6, 2.6, 1.0)


def _drifting(rng: np.random.Generator, counts: list[int], shift: float = 1.0) -> tuple[
        np.ndarray, np.ndarray]:
    """Samples (ms) with `counts[k]` pods in block k, each block at its own drift level."""
    vals = [DRIFT[k] * shift * 20.0 * rng.lognormal(0.0, 0.1, n) for k, n in enumerate(counts)]
    blocks = [np.full(n, k) for k, n in enumerate(counts)]
    return np.concatenate(vals), np.concatenate(blocks)


# The candidate lost pods in the fast blocks (failures, a block cut short): its pooled sample
# leans to the slow blocks, which a pooled test reads as a slowdown.
BASE_COUNTS = [8, 2, 8, 2, 2, 8]
CAND_COUNTS = [2, 8, 2, 8, 8, 2]


def test_pooled_test_mistakes_drift_for_an_effect_stratified_does_not() -> None:
    rng = np.random.default_rng(1)
    a, sa = _drifting(rng, BASE_COUNTS)
    b, sb = _drifting(rng, CAND_COUNTS)
    pooled = stats.permutation_test(a, b, n_perm=4000, seed=1)
    strat = stats.stratified_permutation_test(a, b, sa, sb, n_perm=4000, seed=1)
    assert pooled.p_value < 0.01 and pooled.observed > 0  # the trap this test guards against
    assert strat.p_value > 0.05
    assert (strat.n_a, strat.n_b) == (a.size, b.size)


def test_stratified_false_alarms_stay_at_alpha_under_drift() -> None:
    alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        a, sa = _drifting(rng, BASE_COUNTS)
        b, sb = _drifting(rng, CAND_COUNTS)
        alarms += stats.stratified_permutation_test(a, b, sa, sb, n_perm=1000,
                                                    seed=seed).p_value < 0.05
    assert alarms <= 5  # 2 expected at alpha 0.05; a drift-blind test fails nearly all 40


def test_stratified_test_finds_a_30_percent_shift_under_drift() -> None:
    rng = np.random.default_rng(2)
    a, sa = _drifting(rng, [5] * 6)
    b, sb = _drifting(rng, [5] * 6, shift=1.3)
    res = stats.stratified_permutation_test(a, b, sa, sb, n_perm=4000, seed=2,
                                            alternative="greater")
    assert res.p_value < 0.01 and res.observed > 0


def test_stratified_test_drops_one_sided_strata_and_checks_input() -> None:
    a, b = np.array([1.0, 2.0, 100.0]), np.array([1.5, 2.5])
    res = stats.stratified_permutation_test(a, b, [0, 0, 9], [0, 0], n_perm=200)
    assert res.n_a == 2 and res.n_b == 2  # block 9 has no candidate pod: left out
    with pytest.raises(ValueError, match="both sides"):
        stats.stratified_permutation_test(a[:2], b, [0, 0], [1, 1], n_perm=200)
    with pytest.raises(ValueError, match="one stratum"):
        stats.stratified_permutation_test(a, b, [0], [0, 0], n_perm=200)


# -- the gate on synthetic A/B sessions --------------------------------------------------------

def _session_run(path: Path, run_id: str, seed: int, counts: list[int], *,
                 shift: dict[str, float] | None = None, blocks: bool = True) -> Path:
    """One variant's shim run of a session: pods in drifting blocks with three steps."""
    rng = np.random.default_rng(seed)
    shift = shift or {}
    pods, spans = [], []
    t = 1_000_000_000
    i = 0
    for k, n in enumerate(counts):
        for _ in range(n):
            name = f"shim-{i:04d}"
            level = DRIFT[k] * rng.lognormal(0.0, 0.05)
            steps = {"cri.recv": 0.003, "engine.commit": 0.4, "task.create": 25.0}
            durs = {s: ms * level * shift.get(s, 1.0) * rng.lognormal(0.0, 0.1)
                    for s, ms in steps.items()}
            row = {"pod": name, "submit_s": i * 0.1, "ready_s": i * 0.1 + 0.05,
                   "latency_s": sum(durs.values()) / 1e3 + 0.002, "create_start_s": 0.03,
                   "stop_remove_s": 0.02, "outcome": "ok", "error": "", "warmup": False}
            if blocks:
                row["block"] = k
            pods.append(row)
            for step, ms in durs.items():
                spans.append({"pod": name, "call": CALL_RUN_POD, "step": step,
                              "component": "engine", "start_ns": t,
                              "end_ns": t + int(ms * 1e6)})
                t += int(ms * 1e6) + 1000
            i += 1
    meta = RunMeta(scenario="runc-seq", source="bench", chain="shim", flavor="runc",
                   pods=len(pods), extra={"run_id": run_id})
    return write_run(path, meta, pods=pods, spans=spans)


def _gate(tmp: Path, tag: str, cand_shift: dict[str, float] | None = None,
          blocks: bool = True, sessions: int = 2, **cfg: object) -> gate.GateResult:
    base, cand = [], []
    for s in range(sessions):
        rid = f"{tag}{s:03d}"
        base.append(_session_run(tmp / tag / f"s{s}" / "baseline" / "shim", rid, 10 * s + 1,
                                 BASE_COUNTS, blocks=blocks))
        cand.append(_session_run(tmp / tag / f"s{s}" / "candidate" / "shim", rid, 10 * s + 2,
                                 CAND_COUNTS, shift=cand_shift, blocks=blocks))
    config = gate.GateConfig(n_perm=2000, metrics=["step:*"], **cfg)  # type: ignore[arg-type]
    return gate.compare_runs(load_runs(base), load_runs(cand), config)


def test_gate_stratifies_sessions_and_passes_drift(tmp_path: Path) -> None:
    res = _gate(tmp_path, "same")
    task = next(c for c in res.comparisons if c.metric == "step:task.create")
    assert task.test == "strata" and res.passed, res.to_markdown()
    assert "stratified" in res.to_markdown()
    # The same samples pooled: the drift-blind test raises a false alarm.
    pooled = _gate(tmp_path, "same", stratify=False)
    assert not pooled.passed
    assert {c.test for c in pooled.comparisons if c.test} == {"pooled"}


def test_gate_finds_30_percent_step_slowdown_in_sessions(tmp_path: Path) -> None:
    res = _gate(tmp_path, "slow", cand_shift={"task.create": 1.3})
    regressed = {c.metric for c in res.regressions}
    assert regressed == {"step:task.create"}, res.to_markdown()


def test_gate_falls_back_to_pooled_without_blocks(tmp_path: Path) -> None:
    res = _gate(tmp_path, "noblk", blocks=False)
    assert {c.test for c in res.comparisons if c.test} == {"pooled"}
    assert "pooled across runs" in res.to_markdown()


def test_absolute_floor_keeps_sub_millisecond_steps_out(tmp_path: Path) -> None:
    # +60% on a 3 µs step, +40% on a ~0.6 ms step: real, significant, and meaningless.
    shift = {"cri.recv": 1.6, "engine.commit": 1.4}
    res = _gate(tmp_path, "tiny", cand_shift=shift)
    by = {c.metric: c for c in res.comparisons}
    assert by["step:cri.recv"].p_value is None and "not tested" in by["step:cri.recv"].note
    commit = by["step:engine.commit"]
    assert commit.p_adjusted is not None and commit.p_adjusted < 0.01
    assert commit.status == "ok" and "within floor" in commit.note
    assert res.passed
    strict = _gate(tmp_path, "tiny", cand_shift=shift, abs_floor_ms=0.0)
    assert {c.metric for c in strict.regressions} == {"step:cri.recv", "step:engine.commit"}


def test_abs_floor_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _gate(tmp_path, "cli")
    args = ["--baseline", str(tmp_path / "cli" / "s0" / "baseline"), "--candidate",
            str(tmp_path / "cli" / "s0" / "candidate"), "--permutations", "500"]
    assert gate.main(args + ["--abs-floor-ms", "-1"]) == 2
    assert "--abs-floor-ms" in capsys.readouterr().err
    assert gate.main(args + ["--abs-floor-ms", "2", "--metrics", "step:*"]) == 0
    assert "absolute floor 2 ms" in capsys.readouterr().out


def test_one_pod_per_side_per_block_is_a_paired_test() -> None:
    """`chainbench ab` runs sequential scenarios with blocks of one pod per side: every pod
    drifts on its own, and only the pairing keeps the comparison sharp."""
    rng = np.random.default_rng(5)
    level = np.exp(rng.normal(0.0, 0.5, 16))  # machine state per pair: CV ~50%
    a = 20.0 * level * rng.lognormal(0.0, 0.05, 16)
    same = 20.0 * level * rng.lognormal(0.0, 0.05, 16)
    slow = 1.3 * 20.0 * level * rng.lognormal(0.0, 0.05, 16)
    blocks = np.arange(16)
    null = stats.stratified_permutation_test(a, same, blocks, blocks, n_perm=4000, seed=5)
    hit = stats.stratified_permutation_test(a, slow, blocks, blocks, n_perm=4000, seed=5)
    assert null.p_value > 0.05 and hit.p_value < 0.01
    # The pooled test drowns the same 30% in the drift.
    assert stats.permutation_test(a, slow, n_perm=4000, seed=5).p_value > 0.01
    shift = stats.stratified_shift(a, slow, blocks, blocks)
    assert shift == pytest.approx(float(np.median(slow - a)))
