"""Chains as data: the shape, the calibration file format, what-ifs and pruning."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sim.calibration import CalibrationError, load_calibration, prior_calibration
from sim.chains import ChainError, Dist, build_program, start_sequence, stop_sequence
from sim.cluster import apply_what_ifs
from sim.scenario_model import SettingsError, parse_settings
from sim.vocabulary import CALL_RUN_POD, RUN_POD_STEPS, STEPS


def test_run_pod_steps_follow_the_vocabulary_order():
    cal = prior_calibration()
    for (chain, flavor), refs in RUN_POD_STEPS.items():
        if chain == "containerd":
            continue
        model = cal.model(chain, flavor, "cold")
        assert [s.step for s in model.steps(CALL_RUN_POD)] == [r.step for r in refs]
        for call, steps in model.calls.items():
            assert all(s.step in STEPS for s in steps), call


def test_restore_boot_swaps_the_boot_step_and_vmm_memory():
    cal = prior_calibration()
    cold = cal.model("sandbox", "microvm", "cold")
    warm = cal.model("sandbox", "microvm", "restore")
    names = [s.step for s in warm.steps(CALL_RUN_POD)]
    assert "vm.restore" in names and "vm.boot" not in names
    vmm_cold = [m for m in cold.memory if m.role == "vmm"]
    vmm_warm = [m for m in warm.memory if m.role == "vmm"]
    assert len(vmm_cold) == len(vmm_warm) == 1
    assert vmm_warm[0].pss < vmm_cold[0].pss


def test_calibration_json_round_trip(tmp_path):
    cal = prior_calibration()
    path = cal.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["provenance"] == "prior (not measured)"
    back = load_calibration(path)
    assert back.to_json()["chains"] == cal.to_json()["chains"]
    assert back.node == cal.node


def test_shipped_calibration_loads_and_is_marked():
    cal = load_calibration()
    assert cal.provenance in ("prior (not measured)", "measured")
    assert {"shim/runc", "sandbox/runc"} <= set(cal.chains)


def test_bad_calibration_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"chains": {"shim/runc": {"calls": {
        "RunPodSandbox": [{"step": "no.such.step", "component": "engine",
                           "dist": {"kind": "const", "value_s": 0.1}}]}}}}))
    with pytest.raises(CalibrationError, match="no.such.step"):
        load_calibration(bad)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "missing.json")
    with pytest.raises(ChainError):
        Dist("lognormal", median_s=-1.0, sigma=0.2)


def test_dist_sampling_matches_its_parameters():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(200_000)
    u = rng.random(200_000)
    ln = Dist("lognormal", median_s=0.02, sigma=0.3).sample(z, u)
    assert abs(np.median(ln) - 0.02) / 0.02 < 0.01
    emp = Dist("empirical", quantiles_s=(0.001, 0.002, 0.010)).sample(z, u)
    assert emp.min() >= 0.001 and emp.max() <= 0.010
    assert abs(np.median(emp) - 0.002) < 1e-4


def test_what_ifs_change_the_model():
    cal = prior_calibration()
    base = cal.model("shim", "microvm", "cold")
    s = parse_settings({"vm_boot_ms": 300.0, "shim_pss_mb": 2.0, "step_ms": {"task.create": 5.0},
                        "cores": 16})
    m = apply_what_ifs(base, s)
    boot = next(x for x in m.steps(CALL_RUN_POD) if x.step == "vm.boot")
    assert boot.dist.median() == pytest.approx(0.3)
    assert all(x.dist.median() == pytest.approx(0.005)
               for c in m.calls.values() for x in c if x.step == "task.create")
    assert next(x for x in m.memory if x.role == "shim").pss == 2 * 1024 * 1024
    assert s.capacities(cal.node)["cores"] == 16


def test_uncontended_limits_are_pruned_and_contended_kept():
    cal = prior_calibration()
    model = cal.model("shim", "runc")
    caps = {"cores": 8, "engine_workers": 64, "sandboxer_workers": 1, "vmm_boots": 1}
    p = build_program(model, start_sequence(1), caps, max_in_flight=10)
    assert p.limits == ("cores",)  # 64 engine workers never queue 10 pods
    full = build_program(model, start_sequence(1), caps, max_in_flight=10, prune=False)
    assert set(full.limits) == {"cores", "engine_workers"}
    stop = build_program(model, stop_sequence(2), caps, max_in_flight=10)
    assert [s.call for s in stop.steps][-1] == "RemovePodSandbox"
    assert len(set(stop.instance)) == 2 * 2 + 2


def test_settings_reject_bad_values():
    for table, msg in (({"nodes": 0}, "nodes"), ({"arrival": "zipf"}, "arrival"),
                       ({"arrival": "poisson"}, "rate"), ({"bogus": 1}, "unknown"),
                       ({"step_ms": {"nope": 1.0}}, "unknown steps"),
                       ({"cores": "many"}, "cores")):
        with pytest.raises(SettingsError, match=msg):
            parse_settings(table)


def _step(**kw):
    from sim.chains import Step

    base = dict(call=CALL_RUN_POD, step="sandbox.start", component="sandboxer",
                dist=Dist("const", value_s=0.01), limit="sandboxer_workers", hold=1.0)
    return Step(**(base | kw))


def test_two_limit_steps_validate_and_round_trip():
    from sim.chains import ChainModel, Step

    s = _step(cores=0.4)
    assert Step.from_json(CALL_RUN_POD, json.loads(json.dumps(s.to_json()))) == s
    assert "cores" not in _step().to_json()  # one-limit steps keep the old format
    with pytest.raises(ChainError, match="needs a pool"):
        _step(limit="cores", hold=0.5, cores=0.2)
    with pytest.raises(ChainError, match="needs a pool"):
        _step(limit=None, cores=0.2)
    with pytest.raises(ChainError, match="cores must be in"):
        _step(hold=0.3, cores=0.5)
    m = ChainModel("sandbox", "runc", {CALL_RUN_POD: (s,)})
    assert ChainModel.from_json("sandbox/runc", m.to_json()).steps(CALL_RUN_POD) == (s,)


def test_two_limit_program_binds_both_limits_and_prunes_each():
    from sim.chains import ChainModel

    m = ChainModel("sandbox", "runc", {CALL_RUN_POD: (_step(cores=0.4),
                                                      _step(step="sandbox.create"))})
    both = build_program(m, [CALL_RUN_POD], {"cores": 2, "sandboxer_workers": 1}, 10)
    assert both.limits == ("cores", "sandboxer_workers")
    assert both.limit_index == (1, 1) and both.core_hold == (0.4, 0.0)
    assert both.queued_pools == frozenset({1}) and both.two_limit
    # a pool that can never be short leaves only the time on the cores contended
    cores_only = build_program(m, [CALL_RUN_POD], {"cores": 2, "sandboxer_workers": 64}, 10)
    assert cores_only.limits == ("cores",)
    assert cores_only.limit_index == (0, -1) and cores_only.hold[0] == 0.4
    assert not cores_only.two_limit
    # enough cores: the pool alone, held for the whole step
    pool_only = build_program(m, [CALL_RUN_POD], {"cores": 64, "sandboxer_workers": 1}, 10)
    assert pool_only.limits == ("sandboxer_workers",) and not pool_only.two_limit
    assert pool_only.hold == (1.0, 1.0)
    with pytest.raises(ChainError, match="capacity"):
        build_program(m, [CALL_RUN_POD], {"sandboxer_workers": 1}, 10)
