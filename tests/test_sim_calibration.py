"""`chainbench calibrate` and `chainbench validate` on bench-schema run directories.

The bench runs here are produced by the model itself and relabelled `source: bench`: a pure
logic check that fitting recovers what generated the data and that validation scores it.
Real bench runs replace them in `make calibration` / CI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scenarios.loader import load_scenario
from sim import calibration
from sim.calibration import calibrate, fit_dist, load_calibration, prior_calibration
from sim.cli_simulate import settings_for, simulate_scenario
from sim.validation import main as validate_main
from sim.vocabulary import CALL_REMOVE_CONTAINER, CALL_RUN_POD, CALLS


def _bench_like(out: Path, scenario: str, seed: int, **overrides) -> Path:
    sc = load_scenario(scenario)
    from dataclasses import replace
    sc = replace(sc, **overrides)
    # The prior is the ground truth here, whatever calibration the repo ships.
    for p in simulate_scenario(sc, settings_for(sc, {"seed": seed}), out, progress=None,
                               cal=prior_calibration()):
        meta = json.loads((p / "run.json").read_text())
        meta["source"] = "bench"
        meta["host"]["accel"] = "tcg"
        (p / "run.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    seq = _bench_like(root / "seq", "runc-seq", 11, pods=60)
    c10 = _bench_like(root / "c10", "runc-c10", 12)
    return seq, c10


def test_calibrate_recovers_step_costs_and_memory(bench_dirs, tmp_path):
    seq, _ = bench_dirs
    out = tmp_path / "cal.json"
    assert calibration.main([str(seq), "--out", str(out)]) == 0
    cal = load_calibration(out)
    truth = prior_calibration()
    assert cal.provenance == "measured" and len(cal.sources) == 2
    assert cal.host["accel"] == "tcg" and cal.host["cores"] > 0
    for chain in ("shim", "sandbox"):
        fitted = {s.step: s for s in cal.model(chain, "runc").steps(CALL_RUN_POD)}
        for s in truth.model(chain, "runc").steps(CALL_RUN_POD):
            assert fitted[s.step].dist.median() == pytest.approx(s.dist.median(), rel=0.15), \
                (chain, s.step)
            assert fitted[s.step].limit == s.limit
        shim_mem = {m.role: m for m in cal.model(chain, "runc").memory}
        for m in truth.model(chain, "runc").memory:
            assert shim_mem[m.role].pss == pytest.approx(m.pss, rel=0.1)
    # microvm was not benched: it keeps the prior, and says so
    assert cal.chains["shim/microvm"].provenance == "prior (not measured)"
    assert cal.chains["shim/runc"].provenance.startswith("measured")


def test_fit_dist_families():
    assert fit_dist([0.01] * 5).kind == "lognormal"
    d = fit_dist([0.001 * i for i in range(1, 41)])
    assert d.kind == "empirical" and d.quantiles_s[0] == pytest.approx(0.001)


def test_validate_passes_on_self_consistent_runs(bench_dirs, capsys):
    seq, c10 = bench_dirs
    rc = validate_main(["--calibrate-on", str(seq), "--validate-on", str(c10),
                        "--replications", "6", "--threshold", "0.25"])
    out = capsys.readouterr().out
    assert "run_pod_p95_ms" in out and "pods_per_s" in out
    assert rc == 0, out


def test_validate_fails_above_threshold_and_prints_json(bench_dirs, capsys):
    seq, c10 = bench_dirs
    rc = validate_main(["--calibrate-on", str(seq), "--validate-on", str(c10),
                        "--replications", "2", "--threshold", "0.0001", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["passed"] is False
    assert {s["chain"] for s in data["scores"]} == {"shim", "sandbox"}


def test_bad_input_exits_2(tmp_path, capsys):
    assert calibration.main([str(tmp_path / "nope"), "--out", str(tmp_path / "c.json")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert calibration.main(["--out", str(tmp_path / "c.json")]) == 2
    assert validate_main(["--calibrate-on", str(tmp_path), "--validate-on",
                          str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err


def test_prior_flag_writes_the_shipped_format(tmp_path):
    out = tmp_path / "prior.json"
    assert calibration.main(["--prior", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["provenance"] == "prior (not measured)"


def test_children_cpu_column_sets_the_hold_of_fork_exec_steps(bench_dirs, tmp_path):
    import shutil

    import pandas as pd

    seq, _ = bench_dirs
    copy = tmp_path / "seq"
    shutil.copytree(seq, copy)
    cpu_file = copy / "shim" / "cpu.parquet"
    cpu = pd.read_parquet(cpu_file)
    busy = cpu.set_index("role")["cpu_s"]
    # runc's CPU, reaped by the shim: make the shim role look ~fully CPU-bound
    cpu["cpu_children_s"] = [busy["shim"] * 5 if r == "shim" else 0.0 for r in cpu["role"]]
    cpu.to_parquet(cpu_file, index=False)
    without = calibrate([str(seq)]).model("shim", "runc")
    with_children = calibrate([str(copy)]).model("shim", "runc")
    prior = prior_calibration().model("shim", "runc")
    tc = {s.step: s for s in with_children.steps(CALL_RUN_POD)}
    tw = {s.step: s for s in without.steps(CALL_RUN_POD)}
    tp = {s.step: s for s in prior.steps(CALL_RUN_POD)}
    assert tw["task.create"].hold == tp["task.create"].hold  # not observable: prior kept
    assert tc["task.create"].hold == pytest.approx(1.0)  # observed: measured share
    assert tc["engine.prepare"].hold == 1.0  # worker pools are held for the whole step


def test_blocks_follow_the_bench_load_driver_rule():
    from sim.cluster import blocks

    # runc-c10: block max(10, 5) = 10, memory points 0, 10, 25, 50
    assert blocks(50, 10, (0, 10, 25, 50)) == [(0, 10), (10, 20), (20, 25), (25, 35),
                                               (35, 45), (45, 50)]
    assert blocks(20, 5, ()) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert blocks(100, 0, (0, 50, 100)) == [(0, 100)]


def _with_cpu(src: Path, dst: Path, per_role: dict[str, float]) -> Path:
    """A copy of a bench dir whose shim-chain cpu table says `per_role` CPU seconds per pod
    (daemons: one row for the whole run; per-pod processes: one row per pod), children
    included."""
    import shutil

    import pandas as pd

    shutil.copytree(src, dst)
    run = dst / "shim"
    n = len(pd.read_parquet(run / "pods.parquet"))
    rows = []
    for role, s in per_role.items():
        if role in calibration.DAEMON_ROLES:
            rows.append({"role": role, "pid": 1, "cpu_s": s * n, "cpu_children_s": 0.0})
        else:
            rows += [{"role": role, "pid": 100 + i, "cpu_s": s / 2, "cpu_children_s": s / 2}
                     for i in range(n)]
    pd.DataFrame(rows).to_parquet(run / "cpu.parquet", index=False)
    return dst


def test_cpu_accounting_puts_every_measured_step_on_the_cores(bench_dirs, tmp_path):
    seq, _ = bench_dirs
    tick = 4 * 0.5 / calibration.CLK_TCK  # truncation handed back per per-pod process
    low = calibrate([str(_with_cpu(seq, tmp_path / "a", {"engine": 0.001,
                                                        "shim": 0.02 - tick}))])
    high = calibrate([str(_with_cpu(seq, tmp_path / "b", {"engine": 0.2,
                                                         "shim": 0.02 - tick}))])
    lo = {(s.call, s.step): s for c in CALLS for s in low.model("shim", "runc").steps(c)}
    hi = {(s.call, s.step): s for c in CALLS for s in high.model("shim", "runc").steps(c)}
    tc, ts = (CALL_RUN_POD, "task.create"), (CALL_RUN_POD, "task.start")
    # The shim's CPU (bench times task.create on the engine side) lands on the shim's steps,
    # in proportion to their time: 20 ms per pod over the shim's start steps.
    busy = sum(s.dist.median() for k, s in lo.items()
               if s.component == "shim" and k[0] in calibration.START_CALLS)
    assert lo[tc].limit == "cores" and lo[tc].hold == pytest.approx(0.02 / busy, rel=0.25)
    assert lo[tc].hold < 0.9
    assert lo[tc].hold == lo[ts].hold
    # Engine bookkeeping runs on the engine's one loop: it keeps the engine's worker for the
    # whole step and queues on the cores inside it for its CPU share (two limits)
    prep = lo[(CALL_RUN_POD, "engine.prepare")]
    assert prep.limit == "engine_workers" and prep.hold == 1.0
    assert prep.cpu > 0 and prep.cores == pytest.approx(prep.cpu)
    assert hi[(CALL_RUN_POD, "engine.commit")].cores == pytest.approx(1.0)
    # Shim teardown is not sampled (the shim is gone): it takes the start-phase share
    assert lo[(CALL_REMOVE_CONTAINER, "task.delete")].hold == pytest.approx(lo[tc].hold)
    # A daemon burning more than its steps last hands the excess to the phase's other steps,
    # down to the free ones once the CPU steps are full
    assert hi[tc].hold == pytest.approx(1.0)
    assert hi[(CALL_RUN_POD, "task.connect")].limit == "cores"
    assert lo[(CALL_RUN_POD, "task.connect")].limit is None
    # ... but never onto the CRI framing steps (no limit), which only record their share
    assert hi[(CALL_RUN_POD, "cri.recv")].limit is None
    assert hi[(CALL_RUN_POD, "cri.recv")].cpu > lo[(CALL_RUN_POD, "cri.recv")].cpu


def test_sandbox_api_calls_hold_a_sandboxer_worker_around_their_cpu(bench_dirs, tmp_path):
    """With children's CPU recorded, a Sandbox API step keeps the sandboxer's worker for the
    whole step and queues on the cores inside it for its measured share (two limits)."""
    import shutil

    import pandas as pd

    seq, _ = bench_dirs
    copy = tmp_path / "seq"
    shutil.copytree(seq, copy)
    cpu_file = copy / "sandbox" / "cpu.parquet"
    cpu = pd.read_parquet(cpu_file)
    cpu["cpu_children_s"] = [0.05 * 60 if r == "sandboxer" else 0.0 for r in cpu["role"]]
    cpu.to_parquet(cpu_file, index=False)
    model = calibrate([str(copy)]).model("sandbox", "runc")
    steps = {(s.call, s.step): s for c in CALLS for s in model.steps(c)}
    for key in ((CALL_RUN_POD, "sandbox.create"), (CALL_RUN_POD, "sandbox.start")):
        s = steps[key]
        assert s.limit == "sandboxer_workers" and s.hold == 1.0, key
        assert 0 < s.cores <= 1.0 and s.cores == pytest.approx(s.cpu), key
    # runc work of the sandboxer's Task API stays on the cores alone
    tc = steps[("CreateContainer", "task.create")]
    assert tc.limit == "cores" and tc.cores == 0.0
    # and the file format carries the second limit
    back = calibration.Calibration.from_json(json.loads(json.dumps(
        calibrate([str(copy)]).to_json())))
    assert back.model("sandbox", "runc").steps(CALL_RUN_POD) == model.steps(CALL_RUN_POD)


def test_vm_boots_hold_their_slot_around_the_vmm_cpu(tmp_path):
    """With the VMM's CPU measured, a boot keeps its boot slot for the whole step and queues on
    the cores inside it (a TCG boot is CPU work of the VMM)."""
    import pandas as pd

    seq = _bench_like(tmp_path / "mvm", "microvm-seq", 5, pods=12)
    for chain in ("shim", "sandbox"):
        f = seq / chain / "cpu.parquet"
        cpu = pd.read_parquet(f)
        if "vmm" not in set(cpu["role"]):
            cpu = pd.concat([cpu, pd.DataFrame([{"role": "vmm", "pid": 900 + i, "cpu_s": 0.3}
                                                for i in range(12)])], ignore_index=True)
        cpu["cpu_children_s"] = 0.0
        cpu.to_parquet(f, index=False)
    cal = calibrate([str(seq)])
    for chain in ("shim", "sandbox"):
        boot = next(s for s in cal.model(chain, "microvm", "restore").steps(CALL_RUN_POD)
                    if s.step == "vm.restore")
        assert boot.limit == "vmm_boots" and boot.hold == 1.0, chain
        assert boot.cores > 0 and boot.cores == pytest.approx(boot.cpu), chain


def test_nested_steps_are_not_counted_twice():
    """A microVM's boot and agent.ready are traced inside the engine's task.create (shim
    chain): the enclosing step keeps only its own time; the server side of the same step
    (task.create in the shim) is not subtracted from its client side."""
    import pandas as pd

    ms = 1_000_000
    rows = [("p", CALL_RUN_POD, "task.create", "engine", 0, 300),
            ("p", CALL_RUN_POD, "vm.restore", "vmm", 50, 170),
            ("p", CALL_RUN_POD, "agent.ready", "shim", 170, 260),
            ("p", CALL_RUN_POD, "task.create", "shim", 270, 299),
            ("p", CALL_RUN_POD, "task.start", "engine", 300, 360),
            ("q", CALL_RUN_POD, "task.create", "engine", 0, 100)]
    sp = pd.DataFrame(rows, columns=["pod", "call", "step", "component", "start_ns",
                                     "end_ns"])
    sp[["start_ns", "end_ns"]] *= ms
    own = calibration._exclusive_ns(sp) // ms
    assert own.tolist() == [300 - 210, 120, 90, 29, 60, 100]


def test_client_cpu_row_is_precise_and_optional(bench_dirs, tmp_path):
    """The load driver's own CPU (role "client", process_time()-precise) gets no tick
    correction and does not change the fit: runs with and without it calibrate alike."""
    import shutil

    import pandas as pd

    seq, _ = bench_dirs
    per_role = {"engine": 0.01, "shim": 0.02}
    without = calibrate([str(_with_cpu(seq, tmp_path / "a", per_role))])
    with_client = _with_cpu(seq, tmp_path / "b", per_role)
    cpu_file = with_client / "shim" / "cpu.parquet"
    cpu = pd.read_parquet(cpu_file)
    row = {"role": calibration.CLIENT_ROLE, "pid": 7, "cpu_s": 0.5, "cpu_children_s": 0.0}
    pd.concat([cpu, pd.DataFrame([row])], ignore_index=True).to_parquet(cpu_file, index=False)
    got = calibrate([str(with_client)])
    for call in CALLS:
        for g, w in zip(got.model("shim", "runc").steps(call),
                        without.model("shim", "runc").steps(call), strict=True):
            assert (g.step, g.limit, g.dist) == (w.step, w.limit, w.dist)
            assert (g.cpu, g.hold, g.cores) == pytest.approx((w.cpu, w.hold, w.cores))
    assert calibration.CLIENT_ROLE in calibration.PRECISE_ROLES
    shutil.rmtree(tmp_path / "a")
