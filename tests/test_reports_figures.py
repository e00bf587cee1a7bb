"""Tests of reports.figures on synthetic run directories: each figure renders a non-empty PNG
with the expected axes, units and legends, and refuses runs with nothing to draw."""
from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

from reports import figures, samples
from reports.schema import Run, load_runs
from runfixtures import make_run, make_session

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> list[Run]:
    d = tmp_path_factory.mktemp("session")
    make_session(d, chains=("shim", "sandbox", "containerd"), seed=4)
    return load_runs([d])


def _check_png(fig: Figure, tmp_path: Path, name: str) -> Path:
    p = figures.save(fig, tmp_path / "out" / name)
    data = p.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # a real plot, not an empty canvas
    w, h = fig.get_size_inches() * 120
    assert w > 500 and h > 300
    return p


def test_latency_cdf(session: list[Run], tmp_path: Path) -> None:
    fig = figures.latency_cdf(session)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "RunPodSandbox latency (ms)"
    assert ax.get_ylabel() == "fraction of pods"
    assert "CDF" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # Reading order shim, sandbox, containerd, each with its p50 and sample count.
    assert [lab.split("/")[0] for lab in labels] == ["shim", "sandbox", "containerd"]
    assert all("ms" in lab and "n=37" in lab for lab in labels)
    _check_png(fig, tmp_path, "cdf.png")
    fig2 = figures.latency_cdf(session, metric="create_start")
    assert fig2.axes[0].get_xlabel().startswith("CreateContainer+StartContainer")


def test_step_waterfall_orders_steps_like_the_vocabulary(session: list[Run],
                                                         tmp_path: Path) -> None:
    fig = figures.step_waterfall(session)
    axes = [a for a in fig.axes if a.get_yticklabels()]
    assert len(axes) == 2  # containerd has no spans of ours: no panel
    shim_ax = axes[0]
    ticks = [t.get_text() for t in shim_ax.get_yticklabels()]
    assert ticks == ["cri.recv", "engine.prepare", "shim.launch", "shim.spawn", "task.connect",
                     "task.create", "task.start", "engine.commit", "cri.reply"]
    assert "median pod" in shim_ax.get_title(loc="left")
    assert axes[-1].get_xlabel().endswith("(ms)")
    shim = next(r for r in session if r.meta.chain == "shim")
    assert samples.median_pod(shim) in shim_ax.get_title(loc="left")
    _check_png(fig, tmp_path, "waterfall.png")


def test_memory_vs_pods_reports_slopes(session: list[Run], tmp_path: Path) -> None:
    fig = figures.memory_vs_pods(session)
    ax_m, ax_p = fig.axes[:2]
    assert ax_m.get_ylabel() == "management PSS (MB)"
    assert ax_m.get_xlabel() == "live pods"
    assert ax_p.get_ylabel() == "management processes"
    mem_labels = [t.get_text() for t in ax_m.get_legend().get_texts()]
    assert any(lab.startswith("shim/runc") and "MB/pod" in lab for lab in mem_labels)
    proc_labels = [t.get_text() for t in ax_p.get_legend().get_texts()]
    assert "shim/runc (bench): 2.00 /pod" in proc_labels  # one shim + one pause per pod
    assert "sandbox/runc (bench): 0.00 /pod" in proc_labels
    _check_png(fig, tmp_path, "memory.png")


def test_throughput_vs_concurrency(tmp_path: Path) -> None:
    for c in (1, 2, 4):
        for chain in ("shim", "sandbox"):
            make_run(tmp_path / f"c{c}" / chain, chain=chain, concurrency=c, seed=c,
                     scenario=f"runc-c{c}")
    runs = load_runs([tmp_path])
    fig = figures.throughput_vs_concurrency(runs)
    ax_t, ax_l = fig.axes[:2]
    assert ax_t.get_ylabel() == "throughput (pods/s)"
    assert ax_l.get_ylabel() == "RunPodSandbox p50 (ms)"
    assert list(ax_t.get_xticks()) == [1, 2, 4]
    assert len(ax_t.get_lines()) == 2
    _check_png(fig, tmp_path, "tp.png")


def test_sim_vs_measured_overlay(tmp_path: Path) -> None:
    for chain in ("shim", "sandbox"):
        make_run(tmp_path / "bench" / chain, chain=chain, source="bench", seed=1)
        make_run(tmp_path / "sim" / chain, chain=chain, source="sim", seed=2, slowdown=1.1)
    make_run(tmp_path / "bench" / "containerd", chain="containerd", seed=3)  # no sim twin
    runs = load_runs([tmp_path])
    assert len(figures.sim_pairs(runs)) == 2
    fig = figures.sim_vs_measured(runs)
    ax_c, ax_b = fig.axes[:2]
    labels = [t.get_text() for t in ax_c.get_legend().get_texts()]
    assert sum("simulated" in lab for lab in labels) == 2
    assert sum("measured" in lab for lab in labels) == 2
    assert ax_b.get_ylabel().endswith("(ms)")
    assert [t.get_text() for t in ax_b.get_xticklabels()] == ["shim/runc", "sandbox/runc"]
    _check_png(fig, tmp_path, "svm.png")


def test_step_distributions(session: list[Run], tmp_path: Path) -> None:
    fig = figures.step_distributions(session)
    titles = [a.get_title() for a in fig.axes if a.get_visible()]
    assert "task.create" in titles and "sandbox.start" in titles
    assert all(a.get_xlabel() == "duration (ms)" for a in fig.axes if a.get_visible())
    _check_png(fig, tmp_path, "steps.png")


def test_figures_refuse_runs_with_nothing_to_draw(tmp_path: Path) -> None:
    make_run(tmp_path / "c", chain="containerd", seed=1)
    runs = load_runs([tmp_path])
    with pytest.raises(ValueError, match="spans"):
        figures.step_waterfall(runs)
    with pytest.raises(ValueError, match="bench/sim"):
        figures.sim_vs_measured(runs)
    with pytest.raises(ValueError):
        figures.latency_cdf([])
