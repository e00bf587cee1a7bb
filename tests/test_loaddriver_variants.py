"""A/B variants in one load-driver session: argument handling, lane rotation, and real lanes
whose daemons run their own tree with their own environment."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import loaddriver
from bench.abrun import export_tree
from bench.chains import run_leftovers
from bench.cri_client import CriClient
from reports.schema import load_run
from scenarios.loader import ScenarioError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra, msg", [
    (["--variant", f"a={REPO}"], "at least two"),
    (["--variant", f"a={REPO}", "--variant", f"a={REPO}"], "twice"),
    (["--variant", f"1x={REPO}", "--variant", f"b={REPO}"], "short identifier"),
    (["--variant", "a=/nonexistent", "--variant", f"b={REPO}"], "not a chainbench source tree"),
    (["--variant", f"a={REPO}", "--variant", f"b={REPO}", "--variant-env", "c:K=V"],
     "no variant 'c'"),
    (["--variant", f"a={REPO}", "--variant", f"b={REPO}", "--variant-env", "a:K"],
     "NAME:KEY=VALUE"),
])
def test_bad_variants_are_clear_errors(tmp_path, extra, msg):
    argv = ["runc-seq", "--chain", "shim", "--out", str(tmp_path), *extra]
    with pytest.raises(ScenarioError, match=msg):
        loaddriver.parse_args(argv)
    assert loaddriver.main(argv) == 2


def test_variants_parse_into_lanes(tmp_path):
    o = loaddriver.parse_args(["runc-seq", "--chain", "shim,sandbox", "--out", str(tmp_path),
                               "--variant", f"base={REPO}", "--variant", f"cand={REPO}",
                               "--variant-env", "cand:CHAINBENCH_SLOWDOWN=task.create:0.3"])
    assert [(v.name if v else None, c) for v, c in o.lanes()] == [
        ("base", "shim"), ("cand", "shim"), ("base", "sandbox"), ("cand", "sandbox")]
    assert o.variants[1].env == {"CHAINBENCH_SLOWDOWN": "task.create:0.3"}
    assert o.variants[0].env == {}
    assert o.lane_out(o.variants[1], "shim") == tmp_path / "cand" / "shim"
    plain = loaddriver.parse_args(["runc-seq", "--chain", "shim", "--out", str(tmp_path)])
    assert plain.lane_out(None, "shim") == tmp_path / "shim"  # layout without variants


def test_variant_order_alternates_and_keeps_a_chains_variants_together(tmp_path):
    b = loaddriver.Bench(loaddriver.parse_args(
        ["runc-seq", "--chain", "shim,sandbox", "--out", str(tmp_path),
         "--variant", f"A={REPO}", "--variant", f"B={REPO}"]))
    for v, c in b.o.lanes():
        ld = loaddriver.ChainLoad(chain=SimpleNamespace(name=c),  # type: ignore[arg-type]
                                  client=CriClient("/x"), pods=[], variant=v)
        b.loads[ld.lane] = ld
    orders = [[ld.lane for ld in b.order(k)] for k in range(4)]
    for order in orders:
        assert sorted(order) == sorted(b.loads)
        for chain in ("shim", "sandbox"):  # a chain's two variants run back to back
            pos = [i for i, lane in enumerate(order) if lane.endswith("/" + chain)]
            assert pos[1] - pos[0] == 1
    firsts = [next(lane for lane in o if lane.endswith("/shim")) for o in orders]
    assert firsts == ["A/shim", "B/shim", "A/shim", "B/shim"]
    assert {o[0].split("/")[1] for o in orders} == {"shim", "sandbox"}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().partition("=")[::2] for x in raw if b"=" in x)


def test_lanes_run_their_own_tree_and_env(tmp_path):
    """Real daemons: each lane's engine/sandboxer runs from its variant's tree (cwd, PYTHONPATH)
    with its variant's env; a short session writes DIR/<variant>/<chain> with pod blocks."""
    cand_tree, commit = export_tree("HEAD", tmp_path)
    opts = loaddriver.parse_args(
        ["runc-seq", "--chain", "shim,sandbox", "--out", str(tmp_path / "out"),
         "--variant", f"base={REPO}", "--variant", f"cand={cand_tree}",
         "--variant-env", "cand:CHAINBENCH_AB_MARK=cand-lane"])
    assert opts.variants[1].commit == commit

    async def lanes() -> dict[str, list[tuple[str, dict[str, str]]]]:
        b = loaddriver.Bench(opts)
        seen: dict[str, list[tuple[str, dict[str, str]]]] = {}
        try:
            await b.start_chains()
            for lane, ld in b.loads.items():
                seen[lane] = [(os.readlink(f"/proc/{pid}/cwd"), _environ(pid))
                              for pid in ld.chain.daemons()]
        finally:
            await loaddriver._stop_all(b)
        assert not b.leftovers and not run_leftovers(b.run_base, b.run_id)
        return seen

    seen = asyncio.run(lanes())
    assert sorted(seen) == ["base/sandbox", "base/shim", "cand/sandbox", "cand/shim"]
    assert len(seen["cand/sandbox"]) == 2  # engine + sandboxer
    for lane, daemons in seen.items():
        tree = str(REPO if lane.startswith("base/") else cand_tree)
        for cwd, env in daemons:
            assert cwd == tree and env["PYTHONPATH"] == tree
            assert (env.get("CHAINBENCH_AB_MARK") == "cand-lane") == lane.startswith("cand/")

    out = tmp_path / "run"
    rc = loaddriver.main(["runc-seq", "--chain", "shim", "--out", str(out), "--pods", "4",
                          "--warmup", "1", "--block", "2", "--variant", f"base={REPO}",
                          "--variant", f"cand={REPO}"])
    assert rc == 0
    for v in ("base", "cand"):
        run = load_run(out / v / "shim")
        assert list(run.pods["block"]) == [0, 0, 1, 1]
        assert run.meta.extra["variant"] == v and run.meta.extra["tree"] == str(REPO)
        assert run.meta.extra["lanes_in_session"] == ["base/shim", "cand/shim"]
    assert load_run(out / "base" / "shim").meta.extra["run_id"] == \
        load_run(out / "cand" / "shim").meta.extra["run_id"]
    assert not (out / "shim").exists()
