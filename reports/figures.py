"""Owns: the figures of chainbench results (latency CDFs, step waterfalls, memory slopes,
throughput curves, sim-vs-measured overlays, step distributions).

Each function takes loaded runs (reports.schema.Run) and returns a matplotlib Figure built on
the Agg canvas without pyplot, so reports can render in threads/CI without a display and
notebooks display the same objects.  Storage units are s/bytes; axes are labelled in ms/MB.
A function raises ValueError when the runs hold nothing it can draw, so callers can skip it.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from reports import samples as smp
from reports.schema import Run
from reports.summary import MB, memory_per_pod, summarize
from sim.vocabulary import CALL_RUN_POD, CHAINS, MGMT_ROLES

CHAIN_COLORS: dict[str, str] = {"shim": "#1f77b4", "sandbox": "#e8710a", "containerd": "#2ca02c"}
COMPONENT_COLORS: dict[str, str] = {
    "client": "#5f5f5f",
    "engine": "#9a9a9a",
    "shim": "#1f77b4",
    "runc": "#17becf",
    "sandboxer": "#e8710a",
    "vmm": "#9467bd",
    "agent": "#bc80bd",
    "containerd": "#2ca02c",
}
_LINESTYLES = ("-", "--", ":", "-.")
_STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "legend.fontsize": 8.5,
    "legend.frameon": False,
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig works without pyplot or a display
    return fig


def _styled(fn):  # type: ignore[no-untyped-def]
    """Run a figure builder under the house style.  rcParams are read when artists are made,
    so a scoped context styles our figures without leaking into a notebook's own plots."""
    import functools

    import matplotlib

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def chain_color(chain: str) -> str:
    return CHAIN_COLORS.get(chain, "#444444")


def _run_styles(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(color, linestyle) per run: color by chain, linestyle separates runs of one chain."""
    count: dict[str, int] = {}
    out = []
    for r in runs:
        k = count.get(r.meta.chain, 0)
        count[r.meta.chain] = k + 1
        out.append((chain_color(r.meta.chain), _LINESTYLES[k % len(_LINESTYLES)]))
    return out


def _ms_axis(ax: Axes, values: np.ndarray, axis: str = "x") -> None:
    """Log scale when samples span more than a decade and a half (runc vs microVM)."""
    v = values[values > 0]
    if v.size and float(v.max()) / float(v.min()) > 30:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        # Plain numbers (10, 100, 1000 ms) read faster than 10^1, 10^2, 10^3.
        # Ticks at 1-2-5 of each decade, so a range under two decades still has several; the
        # default minor labels (2x10^1, 3x10^1, ...) collide on such a range.
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        target.set_minor_formatter(NullFormatter())


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(values)
    y = np.arange(1, x.size + 1) / x.size
    return x, y


def _fmt_ms(v: float) -> str:
    if v < 10:
        return f"{v:.2f}"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def ordered_runs(runs: Iterable[Run]) -> list[Run]:
    """Runs in a stable reading order: shim, sandbox, containerd; bench before sim."""
    def key(r: Run) -> tuple:
        m = r.meta
        ci = CHAINS.index(m.chain) if m.chain in CHAINS else len(CHAINS)
        return (m.scenario, ci, m.flavor, m.source != "bench", m.concurrency, str(r.path))
    return sorted(runs, key=key)


@_styled
def latency_cdf(
    runs: Sequence[Run], metric: str = "run_pod_sandbox", title: str | None = None
) -> Figure:
    """Empirical CDF of a per-pod latency (default RunPodSandbox), one line per run."""
    data = [(r, smp.sample(r, metric) * 1e3) for r in ordered_runs(runs)]
    data = [(r, v) for r, v in data if v.size]
    if not data:
        raise ValueError(f"no samples of {metric} in the given runs")
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    styles = _run_styles([r for r, _ in data])
    with_conc = len({r.meta.concurrency for r, _ in data}) > 1
    for (r, v), (color, ls) in zip(data, styles):
        x, y = _ecdf(v)
        lab = (f"{smp.label(r, with_conc=with_conc)}  p50 {_fmt_ms(float(np.median(v)))} ms, "
               f"n={v.size}")
        ax.step(x, y, where="post", color=color, linestyle=ls, linewidth=1.8, label=lab)
    allv = np.concatenate([v for _, v in data])
    _ms_axis(ax, allv)
    ax.axhline(0.5, color="#999999", linewidth=0.8, linestyle=":")
    ax.axhline(0.95, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"{smp.METRIC_TITLES.get(metric, metric)} (ms)")
    ax.set_ylabel("fraction of pods")
    scen = sorted({r.meta.scenario for r, _ in data})
    ax.set_title(title or f"{smp.METRIC_TITLES.get(metric, metric)} CDF — {', '.join(scen)}")
    if len(data) <= 3:
        ax.legend(loc="lower right")
    else:  # many curves spread over the width: below the axes nothing is hidden
        fig.legend(loc="outside lower center", ncols=2)
    return fig


@_styled
def step_waterfall(runs: Sequence[Run], title: str | None = None) -> Figure:
    """RunPodSandbox steps of each run's median pod as a timeline (ms from the first step)."""
    panels = []
    for r in ordered_runs(runs):
        sp = r.spans[r.spans["call"] == CALL_RUN_POD]
        if sp.empty:
            continue
        ok = smp.ok_pods(r)
        ok = ok[ok["pod"].isin(set(sp["pod"]))].dropna(subset=["latency_s"])
        if ok.empty:
            continue
        ok = ok.sort_values("latency_s")
        row = ok.iloc[(len(ok) - 1) // 2]
        pod_sp = sp[sp["pod"] == row["pod"]].sort_values("start_ns")
        panels.append((r, str(row["pod"]), float(row["latency_s"]) * 1e3, pod_sp))
    if not panels:
        raise ValueError("no RunPodSandbox spans in the given runs")
    heights = [max(2, len(smp.step_order(r))) * 0.32 + 0.7 for r, *_ in panels]
    fig = _figure(8.0, sum(heights) + 0.6)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights})[:, 0]
    used_components: dict[str, str] = {}
    for ax, (r, pod, lat_ms, pod_sp) in zip(axes, panels):
        order = smp.step_order(r)
        t0 = int(pod_sp["start_ns"].min())
        ypos = {s: i for i, s in enumerate(order)}
        for s in pod_sp.itertuples():
            y = ypos.get(str(s.step))
            if y is None:
                continue
            start = (s.start_ns - t0) / 1e6
            dur = (s.end_ns - s.start_ns) / 1e6
            color = COMPONENT_COLORS.get(str(s.component), "#444444")
            used_components[str(s.component)] = color
            ax.barh(y, max(dur, 1e-3), left=start, height=0.62, color=color, edgecolor="none")
            ax.text(start + dur, y, f" {_fmt_ms(dur)}", va="center", ha="left", fontsize=7.5,
                    color="#333333")
        ax.axvline(lat_ms, color=chain_color(r.meta.chain), linestyle="--", linewidth=1.0)
        ax.text(lat_ms, -0.75, f" client latency {_fmt_ms(lat_ms)} ms", fontsize=7.5,
                color=chain_color(r.meta.chain), va="bottom", ha="right")
        ax.set_yticks(range(len(order)), order)
        ax.set_ylim(len(order) - 0.4, -0.9)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{smp.label(r)} — median pod {pod}", fontsize=10, loc="left",
                     color=chain_color(r.meta.chain))
    axes[-1].set_xlabel("time since the pod's first RunPodSandbox step (ms)")
    xmax = max(max(p[2] for p in panels),
               max((p[3]["end_ns"].max() - p[3]["start_ns"].min()) / 1e6 for p in panels))
    axes[-1].set_xlim(0, xmax * 1.12)
    handles = [Patch(color=c, label=k) for k, c in used_components.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
               title="component")
    fig.suptitle(title or "RunPodSandbox step waterfall (median pod)", fontweight="bold")
    return fig


def _mgmt_points(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample instant: live pods, summed management PSS (MB), management process count."""
    mem = run.memory
    m = mem[mem["role"].isin(sorted(MGMT_ROLES))]
    times = mem.groupby("t_s")["pods_alive"].max()
    agg = m.groupby("t_s").agg(pss=("pss", "sum"), procs=("pid", "nunique"))
    agg = agg.reindex(times.index, fill_value=0)
    return times.to_numpy(float), agg["pss"].to_numpy(float) / MB, agg["procs"].to_numpy(float)


@_styled
def memory_vs_pods(runs: Sequence[Run], title: str | None = None) -> Figure:
    """Management-plane PSS and process count over live pods, with the fitted slope per pod."""
    usable = [r for r in ordered_runs(runs) if not r.memory.empty]
    if not usable:
        raise ValueError("no memory samples in the given runs")
    fig = _figure(10.0, 4.2)
    ax_m, ax_p = fig.subplots(1, 2)
    styles = _run_styles(usable)
    for r, (color, ls) in zip(usable, styles):
        x, pss, procs = _mgmt_points(r)
        slopes = memory_per_pod(r.memory, MGMT_ROLES)
        for ax, y, key, unit in ((ax_m, pss, "pss_mb", "MB/pod"), (ax_p, procs, "procs", "/pod")):
            ax.scatter(x, y, color=color, s=22, zorder=3)
            s = slopes[key]
            if s is not None and np.ptp(x) > 0:
                b, a = np.polyfit(x, y, 1)
                xs = np.array([x.min(), x.max()])
                s = 0.0 if abs(s) < 1e-9 else s  # a flat line prints as 0, not -1e-17
                shown = f"{s:.3g}" if key == "pss_mb" else f"{s:.2f}"
                ax.plot(xs, a + b * xs, color=color, linestyle=ls, linewidth=1.5,
                        label=f"{smp.label(r)}: {shown} {unit}")
            else:
                ax.plot([], [], color=color, label=f"{smp.label(r)}: slope n/a")
    ax_m.set_xlabel("live pods")
    ax_m.set_ylabel("management PSS (MB)")
    ax_m.set_title("Management memory (PSS) vs live pods")
    ax_p.set_xlabel("live pods")
    ax_p.set_ylabel("management processes")
    ax_p.set_title("Management processes vs live pods")
    for ax in (ax_m, ax_p):
        ax.legend(loc="upper left")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    fig.suptitle(title or "Per-pod management cost (shim + pause + sandboxer growth)",
                 fontweight="bold")
    return fig


@_styled
def throughput_vs_concurrency(runs: Sequence[Run], title: str | None = None) -> Figure:
    """Pods/s and RunPodSandbox p50 over concurrency, one line per chain/flavor/source."""
    series: dict[tuple[str, str, str], list[tuple[int, float, float]]] = {}
    for r in runs:
        s = summarize(r)
        if s["pods_per_s"] is None:
            continue
        key = (r.meta.chain, r.meta.flavor, r.meta.source)
        series.setdefault(key, []).append(
            (int(r.meta.concurrency), float(s["pods_per_s"]),
             float(s["run_pod_sandbox_ms"]["p50"] or math.nan)))
    if not series:
        raise ValueError("no run with a throughput figure")
    fig = _figure(10.0, 4.2)
    ax_t, ax_l = fig.subplots(1, 2)
    for (chain, flavor, source), pts in sorted(series.items()):
        pts.sort()
        c = np.array([p[0] for p in pts])
        ls = "-" if source == "bench" else "--"
        lab = f"{chain}/{flavor} ({source})"
        ax_t.plot(c, [p[1] for p in pts], marker="o", color=chain_color(chain), linestyle=ls,
                  label=lab)
        ax_l.plot(c, [p[2] for p in pts], marker="o", color=chain_color(chain), linestyle=ls,
                  label=lab)
    concs = sorted({p[0] for pts in series.values() for p in pts})
    for ax in (ax_t, ax_l):
        ax.set_xlabel("concurrency (parallel RunPodSandbox clients)")
        ax.set_xticks(concs)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best")
    ax_t.set_ylabel("throughput (pods/s)")
    ax_t.set_title("Pod start throughput")
    ax_l.set_ylabel("RunPodSandbox p50 (ms)")
    ax_l.set_title("Median latency under load")
    fig.suptitle(title or "Throughput vs concurrency", fontweight="bold")
    return fig


def sim_pairs(runs: Iterable[Run]) -> list[tuple[Run, Run]]:
    """(bench, sim) run pairs of the same scenario, chain, flavor and concurrency."""
    bench: dict[tuple, Run] = {}
    sim: dict[tuple, Run] = {}
    for r in ordered_runs(runs):
        k = (r.meta.scenario, r.meta.chain, r.meta.flavor, r.meta.concurrency)
        (bench if r.meta.source == "bench" else sim).setdefault(k, r)
    return [(bench[k], sim[k]) for k in bench if k in sim]


@_styled
def sim_vs_measured(runs: Sequence[Run], metric: str = "run_pod_sandbox",
                    title: str | None = None) -> Figure:
    """Measured (solid) vs simulated (dashed) CDFs, and p50/p95 bars with the sim error."""
    pairs = [(b, s) for b, s in sim_pairs(runs)
             if smp.sample(b, metric).size and smp.sample(s, metric).size]
    if not pairs:
        raise ValueError("no bench/sim pair of the same scenario, chain and flavor")
    fig = _figure(11.0, 4.4)
    ax_c, ax_b = fig.subplots(1, 2, width_ratios=[1.25, 1])
    allv = []
    for b, s in pairs:
        color = chain_color(b.meta.chain)
        for run, ls, src in ((b, "-", "measured"), (s, "--", "simulated")):
            v = smp.sample(run, metric) * 1e3
            allv.append(v)
            x, y = _ecdf(v)
            ax_c.step(x, y, where="post", color=color, linestyle=ls, linewidth=1.8,
                      label=f"{b.meta.chain}/{b.meta.flavor} {src} (n={v.size})")
    _ms_axis(ax_c, np.concatenate(allv))
    ax_c.set_ylim(0, 1.02)
    ax_c.set_xlabel(f"{smp.METRIC_TITLES.get(metric, metric)} (ms)")
    ax_c.set_ylabel("fraction of pods")
    ax_c.set_title("CDF: measured vs simulated")
    ax_c.legend(loc="lower right")

    width = 0.2
    xt, xl = [], []
    top = 0.0
    for i, (b, s) in enumerate(pairs):
        vb, vs = smp.sample(b, metric) * 1e3, smp.sample(s, metric) * 1e3
        color = chain_color(b.meta.chain)
        for j, q in enumerate((50, 95)):
            mb, ms = float(np.percentile(vb, q)), float(np.percentile(vs, q))
            top = max(top, mb, ms)
            x0 = i + (j - 0.5) * 2.2 * width
            ax_b.bar(x0 - width / 2, mb, width, color=color, alpha=0.95 if q == 50 else 0.6)
            ax_b.bar(x0 + width / 2, ms, width, color=color, alpha=0.95 if q == 50 else 0.6,
                     hatch="//", edgecolor="white", linewidth=0)
            err = (ms - mb) / mb * 100 if mb else math.nan
            ax_b.text(x0, max(mb, ms), f"p{q}\n{err:+.0f}%", ha="center", va="bottom",
                      fontsize=7.5)
        xt.append(i)
        xl.append(f"{b.meta.chain}/{b.meta.flavor}")
    ax_b.set_xticks(xt, xl)
    ax_b.set_ylim(0, top * 1.25)
    ax_b.set_ylabel(f"{smp.METRIC_TITLES.get(metric, metric)} (ms)")
    ax_b.set_title("p50 / p95 (labels: sim error)")
    ax_b.grid(axis="x", visible=False)
    ax_b.legend(handles=[Patch(facecolor="#888888", label="measured"),
                         Patch(facecolor="#888888", hatch="//", edgecolor="white",
                               label="simulated")], loc="upper left")
    scen = sorted({b.meta.scenario for b, _ in pairs})
    fig.suptitle(title or f"Simulated vs measured — {', '.join(scen)}", fontweight="bold")
    return fig


@_styled
def step_distributions(runs: Sequence[Run], steps: Sequence[str] | None = None,
                       title: str | None = None, ncols: int = 3) -> Figure:
    """Per-step duration ECDFs (bench solid, sim dashed) with a lognormal fit (dotted) to
    each bench sample: what calibration fits and how well the shape is captured."""
    per_run = [(r, smp.step_durations(r)) for r in ordered_runs(runs)]
    per_run = [(r, d) for r, d in per_run if not d.empty]
    if not per_run:
        raise ValueError("no RunPodSandbox spans in the given runs")
    if steps is None:
        steps = smp.merged_step_order([r for r, _ in per_run])
    steps = list(steps)
    nrows = math.ceil(len(steps) / ncols)
    fig = _figure(3.4 * ncols, 2.6 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    handles: dict[str, Line2D] = {}
    for ax, step in zip(axes, steps):
        col = f"step:{step}"
        vals_all = []
        for r, d in per_run:
            if col not in d.columns:
                continue
            v = d[col].dropna().to_numpy(float) * 1e3
            v = v[v > 0]
            if v.size == 0:
                continue
            vals_all.append(v)
            color = chain_color(r.meta.chain)
            ls = "-" if r.meta.source == "bench" else "--"
            x, y = _ecdf(v)
            ax.step(x, y, where="post", color=color, linestyle=ls, linewidth=1.4)
            handles.setdefault(f"{r.meta.chain} {r.meta.source}",
                               Line2D([], [], color=color, linestyle=ls))
            if r.meta.source == "bench" and v.size >= 3:
                mu, sigma = float(np.log(v).mean()), float(np.log(v).std(ddof=1))
                xs = np.geomspace(v.min(), v.max(), 60)
                ax.plot(xs, _lognorm_cdf(xs, mu, sigma), color=color, linestyle=":",
                        linewidth=1.2)
                handles.setdefault("lognormal fit", Line2D([], [], color="#444444",
                                                           linestyle=":"))
        if vals_all:
            _ms_axis(ax, np.concatenate(vals_all))
        ax.set_title(step, fontsize=9.5)
        ax.set_xlabel("duration (ms)")
        ax.set_ylim(0, 1.02)
    for ax in axes[len(steps):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("fraction of pods")
    fig.legend(handles=list(handles.values()), labels=list(handles), loc="outside lower center",
               ncols=max(1, len(handles)))
    fig.suptitle(title or "RunPodSandbox step durations", fontweight="bold")
    return fig


def _lognorm_cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    from math import erf, sqrt

    if sigma <= 0:
        return (x >= math.exp(mu)).astype(float)
    z = (np.log(x) - mu) / (sigma * sqrt(2.0))
    return 0.5 * (1.0 + np.vectorize(erf)(z))


def png_bytes(fig: Figure, dpi: int = 120) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as PNG (creating parent directories) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(png_bytes(fig, dpi=dpi))
    return p
