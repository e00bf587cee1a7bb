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


def test_accept_rule_puts_the_end_of_cri_recv_on_the_engine_loop(sessions):
    """The time the load driver's CPU per call does not cover holds the engine loop and a
    core, after the call's travel (calibration's ACCEPT_RULE); without the driver's CPU
    recorded, cri.recv stays free."""
    import pandas as pd

    from sim.calibration import fit_chain, prior_calibration
    from sim.vocabulary import CALL_RUN_POD

    seq, _ = sessions
    run = load_run(seq / "shim")
    base = prior_calibration().chains["shim/runc"]
    plain = {s.step: s for s in fit_chain(run, base).steps(CALL_RUN_POD)}["cri.recv"]
    assert plain.limit is None and not plain.wait_first
    sp = run.spans
    ok = run.pods[(~run.pods["warmup"]) & (run.pods["outcome"] == "ok")]
    recv = sp[(sp["call"] == CALL_RUN_POD) & (sp["step"] == "cri.recv")
              & sp["pod"].isin(ok["pod"])]
    mean_s = float(((recv["end_ns"] - recv["start_ns"]) / 1e9).mean())
    per_call = 0.3 * mean_s
    calls = len(run.pods) * (1 + 2 * int(run.meta.containers_per_pod))
    cpu = pd.concat([run.cpu, pd.DataFrame([{"role": "client", "pid": 1,
                                             "cpu_s": per_call * calls,
                                             "cpu_children_s": 0.0}])], ignore_index=True)
    from dataclasses import replace
    fitted = {s.step: s for s in fit_chain(replace(run, cpu=cpu), base).steps(CALL_RUN_POD)}
    got = fitted["cri.recv"]
    assert got.limit == "engine_workers" and got.wait_first
    # the driver covers ~30% of the call's mean cri.recv (span plus the client gap folded in)
    assert 0.55 < got.hold < 0.75
    assert got.cores == got.hold


def test_handler_rule_holds_the_sandboxer_loop_for_the_handler_and_half_the_rest(sessions):
    """A Sandbox API call traced on both sides (engine client span around the sandboxer's
    handler span): the sandboxer's loop is held for the handler's share plus half of the rest
    (calibration's HANDLER_RULE); traced on one side only, for the whole call."""
    from dataclasses import replace

    import pandas as pd

    from sim.calibration import fit_chain, prior_calibration
    from sim.vocabulary import CALL_RUN_POD

    seq, _ = sessions
    run = load_run(seq / "sandbox")
    run = replace(run, cpu=run.cpu.assign(cpu_children_s=0.0))  # as bench records it
    base = prior_calibration().chains["sandbox/runc"]
    one_side = {s.step: s for s in fit_chain(run, base).steps(CALL_RUN_POD)}["sandbox.create"]
    assert one_side.limit == "sandboxer_workers" and one_side.hold == 1.0
    sp = run.spans
    outer = sp[(sp["call"] == CALL_RUN_POD) & (sp["step"] == "sandbox.create")].copy()
    inner = outer.copy()
    length = inner["end_ns"] - inner["start_ns"]
    inner["start_ns"] = inner["start_ns"] + (length * 0.3).astype("int64")
    inner["end_ns"] = inner["start_ns"] + (length * 0.4).astype("int64")
    outer["component"] = "engine"
    rest = sp.drop(outer.index)
    both = replace(run, spans=pd.concat([rest, outer, inner], ignore_index=True))
    got = {s.step: s for s in fit_chain(both, base).steps(CALL_RUN_POD)}["sandbox.create"]
    assert got.limit == "sandboxer_workers"
    assert got.hold == pytest.approx(0.4 + 0.6 / 2, abs=0.01)
    assert 0 < got.cores <= got.hold
    # microVMs keep the whole call: there a handler awaits its VM, off the loop
    vm = replace(both, meta=replace(both.meta, flavor="microvm"))
    base_vm = prior_calibration().chains["sandbox/microvm"]
    held = {s.step: s for s in fit_chain(vm, base_vm).steps(CALL_RUN_POD)}["sandbox.create"]
    assert held.hold == 1.0


def test_plot_draws_measured_and_predicted_cdfs(sessions, tmp_path, capsys):
    seq, c10 = sessions
    png = tmp_path / "validation.png"
    rc = validate_main(["--calibrate-on", str(seq), "--validate-on", *map(str, c10),
                        "--replications", "2", "--threshold", "10", "--plot", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "figure" in capsys.readouterr().err
    # the curves behind it: measured sessions pooled, and the model's pods over the seeds
    from sim.validation import validate
    curves: list = []
    validate([str(seq)], [str(d) for d in c10], replications=2, curves=curves)
    assert sorted((r.meta.chain, r.meta.source) for r in curves) == [
        ("sandbox", "bench"), ("sandbox", "sim"), ("shim", "bench"), ("shim", "sim")]
    for r in curves:
        assert r.pods["pod"].is_unique and len(r.pods) > 0


def test_offpath_rule_puts_the_pause_cpu_after_run_pod_task_start(sessions):
    """The pause process's CPU (a per-pod process no step owns) becomes an off-path job at
    the end of RunPodSandbox's task.start (calibration's OFFPATH_RULE), with the truncated
    clock ticks of its own two fields handed back; the containers' CPU does not."""
    from dataclasses import replace

    import pandas as pd

    from sim.calibration import CLK_TCK, fit_chain, prior_calibration
    from sim.vocabulary import CALL_RUN_POD, CALL_START_CONTAINER

    seq, _ = sessions
    run = load_run(seq / "shim")
    base = prior_calibration().chains["shim/runc"]
    cpu = run.cpu.assign(cpu_children_s=run.cpu.get("cpu_children_s", 0.0))
    cpu = cpu[~cpu["role"].isin(["pause", "container"])]
    n = len(run.pods)
    extra = pd.DataFrame({"role": ["pause"] * n + ["container"] * n,
                          "pid": range(90_000, 90_000 + 2 * n),
                          "cpu_s": [0.0, 0.01] * n, "cpu_children_s": 0.0})
    without = fit_chain(replace(run, cpu=cpu), base)
    assert all(s.offpath == 0 for c in without.calls.values() for s in c)
    got = fit_chain(replace(run, cpu=pd.concat([cpu, extra], ignore_index=True)), base)
    off = {(s.call, s.step): s.offpath for c in got.calls.values() for s in c if s.offpath}
    pause_rows = extra[extra["role"] == "pause"]
    want = (pause_rows["cpu_s"].sum() + len(pause_rows) * 2 * 0.5 / CLK_TCK) / n
    assert off == {(CALL_RUN_POD, "task.start"): pytest.approx(want, abs=1e-6)}
    assert (CALL_START_CONTAINER, "task.start") not in off
    # read exactly from the container's cgroup (run.json extra "cpu_exact_roles"): as is
    exact_meta = replace(run.meta, extra=dict(run.meta.extra, cpu_exact_roles=["pause"]))
    exact = fit_chain(replace(run, meta=exact_meta,
                              cpu=pd.concat([cpu, extra], ignore_index=True)), base)
    got = {s.step: s.offpath for s in exact.steps(CALL_RUN_POD) if s.offpath}
    assert got == {"task.start": pytest.approx(pause_rows["cpu_s"].sum() / n, abs=1e-6)}
    # pooled sessions keep only the roles every session read exactly
    from sim.pooling import merge_sessions

    tick_run = replace(run, cpu=pd.concat([cpu, extra], ignore_index=True))
    mixed = merge_sessions([replace(tick_run, meta=exact_meta), tick_run])
    assert mixed.meta.extra["cpu_exact_roles"] == []
    both = merge_sessions([replace(tick_run, meta=exact_meta)] * 2)
    assert both.meta.extra["cpu_exact_roles"] == ["pause"]


def test_scores_carry_the_measurements_own_interval(sessions, capsys):
    """Each measured figure comes with its 95% bootstrap interval (sessions resampled when
    pooled, pods for one session), and a failure inside it says so."""
    from sim.validation import Score, render

    seq, c10 = sessions
    validate_main(["--calibrate-on", str(seq), "--validate-on", *map(str, c10),
                   "--replications", "2", "--json"])
    pooled = json.loads(capsys.readouterr().out)["scores"]
    for s in pooled:
        lo, hi = s["ci"]
        assert lo <= s["measured"] <= hi and lo < hi
        assert s["within_ci"] == (lo <= s["predicted"] <= hi)
    validate_main(["--calibrate-on", str(seq), "--validate-on", str(c10[0]),
                   "--replications", "2", "--json"])
    one = {s["metric"]: s for s in json.loads(capsys.readouterr().out)["scores"]}
    assert one["pods_per_s"]["ci"] is None and one["run_pod_p95_ms"]["ci"] is not None
    wide = Score("sandbox", "runc", "x", "run_pod_p95_ms", 100.0, 130.0, sessions=5,
                 ci=(70.0, 160.0))
    narrow = Score("shim", "runc", "x", "run_pod_p95_ms", 100.0, 130.0, sessions=5,
                   ci=(95.0, 105.0))
    table = render([wide, narrow], 0.10).splitlines()
    assert table[1].endswith("FAIL (inside the measured interval)")
    assert table[2].endswith("FAIL") and "-30%..+60%" in table[1]


def test_core_limit_what_if_changes_the_prediction_and_is_checked(sessions, capsys):
    seq, c10 = sessions
    args = ["--calibrate-on", str(seq), "--validate-on", *map(str, c10), "--replications", "2",
            "--threshold", "10", "--json"]
    validate_main(args)
    plain = json.loads(capsys.readouterr().out)
    validate_main(args + ["--core-limit", "1"])
    limited = json.loads(capsys.readouterr().out)
    assert plain["core_limit"] == 0 and limited["core_limit"] == 1
    p = {(s["chain"], s["metric"]): s["predicted"] for s in plain["scores"]}
    q = {(s["chain"], s["metric"]): s["predicted"] for s in limited["scores"]}
    assert p.keys() == q.keys() and p != q  # one job at a time on the cores: not the same
    assert validate_main(args + ["--core-limit", "-1"]) == 2
