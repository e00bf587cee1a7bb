"""Tests of `chainbench report`: it writes report.md, a self-contained report.html and the PNG
figures, with host facts, sample quality and the headline comparison."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from reports import report
from reports.schema import load_runs
from runfixtures import make_run, make_session


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    runs = make_session(root / "runs" / "bench", chains=("shim", "sandbox", "containerd"), seed=5)
    for chain in ("shim", "sandbox"):
        make_run(root / "runs" / "sim" / chain, chain=chain, source="sim", seed=9)
        make_run(root / "runs" / "c1" / chain, chain=chain, concurrency=1, scenario="runc-c1",
                 seed=3)
    out = root / "out"
    rc = report.main([str(runs), str(root / "runs" / "sim"), str(root / "runs" / "c1"),
                      "--out", str(out), "--title", "Synthetic report"])
    assert rc == 0
    return root, out


def test_report_writes_md_html_png_and_summary(built: tuple[Path, Path]) -> None:
    _, out = built
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"cdf-run-pod-runc-c4.png", "waterfall-runc-c4.png", "memory-runc-c4.png",
            "throughput.png", "sim-vs-measured.png"} <= set(pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
        assert f"]({name})" in md  # markdown links the file beside it
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 7
    assert md.startswith("# Synthetic report\n")
    assert "<title>Synthetic report</title>" in html


def test_html_is_self_contained(built: tuple[Path, Path]) -> None:
    _, out = built
    html = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(srcs) == len(list(out.glob("*.png")))
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG")
    # Nothing fetched from elsewhere: no links, scripts or stylesheets by reference.
    assert not re.search(r'(href=|<script|<link|url\(|https?://)', html)


def test_report_content(built: tuple[Path, Path]) -> None:
    _, out = built
    md = (out / "report.md").read_text()
    # Host facts.
    for fact in ("tcg", "6.1.0-test-amd64", "Synthetic CPU", "1.1.5", "1.6.20", "7.2.0",
                 "abc123def456"):
        assert fact in md
    # Sample quality comes before the verdicts.
    assert md.index("## Samples") < md.index("## Headline comparison")
    assert "warm-up excluded" in md and "CV" in md and "outliers" in md
    assert "| shim/runc c=4 | bench | runc-c4 | 40 | 3 | 0 | 37 |" in md
    # Headline: sandbox vs shim p50 ratio with a p-value and sample sizes.
    line = next(ln for ln in md.splitlines()
                if ln.startswith("- runc-c4 (runc, bench, c=4): sandbox RunPodSandbox p50"))
    ratio = float(re.search(r"is (\d+\.\d+)x shim", line).group(1))
    assert 0.2 < ratio < 0.8  # the fixture's sandbox chain is about twice as fast
    assert "permutation p=" in line and "n=37/37" in line
    assert "shim / containerd" in md
    assert "## RunPodSandbox steps (p50 / p95 ms)" in md
    assert "## Simulated vs measured (RunPodSandbox)" in md


def test_build_report_api(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "shim", chain="shim", seed=1)
    out = report.build_report([tmp_path / "runs"], tmp_path / "out")
    assert out == tmp_path / "out"
    md = (out / "report.md").read_text()
    assert "nothing to compare" in md  # one chain only: no headline, said so
    assert (out / "report.html").is_file()
    assert len(load_runs([tmp_path / "runs"])) == 1


def test_report_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "chainbench report:" in capsys.readouterr().err
    assert report.main([]) == 2
    assert not (tmp_path / "o").exists()


def test_report_and_gate_read_real_simulator_output(tmp_path: Path) -> None:
    """The simulator writes the same schema as bench: report and gate take it unchanged."""
    from reports import gate
    from sim.cli_simulate import main as simulate

    assert simulate(["runc-seq", "--out", str(tmp_path / "sim")]) == 0
    runs = load_runs([tmp_path / "sim"])
    assert {r.meta.source for r in runs} == {"sim"}
    out = report.build_report([tmp_path / "sim"], tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "sandbox RunPodSandbox p50 is" in md
    assert (out / "waterfall.png").stat().st_size > 10_000
    res = gate.compare_runs(runs, runs, gate.GateConfig(n_perm=500))
    assert res.passed and any(c.metric == "run_pod_sandbox" for c in res.comparisons)
