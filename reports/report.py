"""Owns: the results report (`chainbench report DIR... --out DIR`): what it says, in which order,
and the files it writes (report.md, a self-contained report.html, the PNG figures,
summary.json).

Order follows DESIGN §5: the machine and the sample quality (counts, warm-up excluded, CV,
outliers) come before any comparison, and every headline ratio carries its sample sizes and a
permutation p-value, so a reader sees how far to trust a number before reading it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from reports import figures as figs
from reports import render as rd
from reports import samples as smp
from reports import stats
from reports.schema import Run, load_runs
from reports.summary import summarize

DEFAULT_OUT = "reports/latest"
# Pairs shown in the headline: (candidate, reference) -> ratio candidate / reference.
HEADLINE_PAIRS: tuple[tuple[str, str], ...] = (("sandbox", "shim"), ("shim", "containerd"),
                                               ("sandbox", "containerd"))


def _run_id(run: Run) -> str:
    m = run.meta
    return f"{m.chain}/{m.flavor} {m.source} {m.scenario} c={m.concurrency}"


def _host_section(runs: Sequence[Run]) -> list[rd.Block]:
    hosts: dict[str, tuple[Any, list[str]]] = {}
    for r in runs:
        h = r.meta.host
        key = json.dumps([h.kernel, h.cpu, h.cores, h.accel, sorted(h.versions.items()),
                          h.commit])
        hosts.setdefault(key, (h, []))[1].append(_run_id(r))
    tools = sorted({k for h, _ in hosts.values() for k in h.versions})
    headers = ["host", "accel", "kernel", "CPU", "cores", *tools, "commit", "runs"]
    rows = []
    for i, (h, ids) in enumerate(hosts.values(), 1):
        rows.append([f"#{i}", h.accel or "-", h.kernel or "-", h.cpu or "-", h.cores or "-",
                     *[h.versions.get(t, "-") for t in tools], h.commit or "-", len(ids)])
    blocks: list[rd.Block] = [rd.Heading("Machine"), rd.Table(headers, rows,
                                                              align_right_from=len(headers))]
    if len(hosts) > 1:
        blocks.append(rd.Para("Runs come from more than one host or commit: compare ratios "
                              "within one host only.", emphasis=True))
    return blocks


def _quality_section(runs: Sequence[Run]) -> list[rd.Block]:
    headers = ["run", "source", "scenario", "pods", "warm-up excluded", "errors", "n samples",
               "mean ms", "CV", "outliers >Q3+3·IQR", "median 95% CI ms"]
    rows = []
    for r in runs:
        v = smp.sample(r, "run_pod_sandbox") * 1e3
        d = stats.describe(v)
        ci = stats.bootstrap_median_ci(v, seed=0)
        pods = r.pods
        rows.append([
            f"{r.meta.chain}/{r.meta.flavor} c={r.meta.concurrency}", r.meta.source,
            r.meta.scenario, len(pods), int(pods["warmup"].sum()),
            int((pods["outcome"] != "ok").sum()), d.n, d.mean,
            None if d.cv is None else round(d.cv, 3), d.outliers,
            "-" if ci is None else f"{ci[0]:.3g}–{ci[1]:.3g}",
        ])
    return [
        rd.Heading("Samples (RunPodSandbox, before any verdict)"),
        rd.Para("Warm-up and failed pods are excluded from every latency figure. A CV above "
                "0.3 or many outliers means the machine was noisy: prefer ratios from "
                "interleaved runs over absolute numbers."),
        rd.Table(headers, rows, align_right_from=3),
    ]


def _summary_section(summaries: list[dict[str, Any]]) -> list[rd.Block]:
    headers = ["run", "source", "scenario", "conc", "RunPod p50 ms", "p95", "p99", "pods/s",
               "C+S p50 ms", "C+S p95", "S+R p50 ms", "S+R p95", "mgmt PSS MB/pod",
               "mgmt RSS MB/pod", "procs/pod", "VMM PSS MB/pod"]
    rows = []
    for s in summaries:
        rp, cs, sr = s["run_pod_sandbox_ms"], s["create_start_container_ms"], s["stop_remove_ms"]
        rows.append([f"{s['chain']}/{s['flavor']}", s["source"], s["scenario"], s["concurrency"],
                     rp["p50"], rp["p95"], rp["p99"], s["pods_per_s"], cs["p50"], cs["p95"],
                     sr["p50"], sr["p95"], s["mgmt_pss_mb_per_pod"], s["mgmt_rss_mb_per_pod"],
                     s["mgmt_procs_per_pod"], s["vmm_pss_mb_per_pod"]])
    return [rd.Heading("Summary per run"),
            rd.Para("C+S = CreateContainer+StartContainer, S+R = Stop+Remove (container and "
                    "pod). mgmt = shims + pause + sandboxer growth: the slope of memory over "
                    "live pods."),
            rd.Table(headers, rows, align_right_from=3)]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def headline(runs: Sequence[Run], n_perm: int = 10_000) -> list[dict[str, Any]]:
    """Ratios candidate/reference per (scenario, flavor, source, concurrency) group."""
    groups: dict[tuple, dict[str, Run]] = {}
    for r in runs:
        k = (r.meta.scenario, r.meta.flavor, r.meta.source, r.meta.concurrency)
        groups.setdefault(k, {}).setdefault(r.meta.chain, r)
    out = []
    for (scen, flavor, source, conc), chains in sorted(groups.items()):
        for cand, ref in HEADLINE_PAIRS:
            if cand not in chains or ref not in chains:
                continue
            rc, rr = chains[cand], chains[ref]
            sc, sr = summarize(rc), summarize(rr)
            for metric, key in (("run_pod_sandbox", "run_pod_sandbox_ms"),
                                ("create_start", "create_start_container_ms"),
                                ("stop_remove", "stop_remove_ms")):
                a, b = smp.sample(rc, metric) * 1e3, smp.sample(rr, metric) * 1e3
                if a.size == 0 or b.size == 0:
                    continue
                p = stats.permutation_test(b, a, n_perm=n_perm, seed=0).p_value
                ma, mb = float(np.median(a)), float(np.median(b))
                out.append({"scenario": scen, "flavor": flavor, "source": source,
                            "concurrency": conc, "pair": f"{cand} / {ref}",
                            "metric": f"{smp.METRIC_TITLES[metric]} p50", "cand": ma, "ref": mb,
                            "unit": "ms", "ratio": _ratio(ma, mb), "n": f"{a.size}/{b.size}",
                            "p": p})
            for name, key, unit in (("throughput", "pods_per_s", "pods/s"),
                                    ("mgmt PSS per pod", "mgmt_pss_mb_per_pod", "MB"),
                                    ("mgmt processes per pod", "mgmt_procs_per_pod", "procs")):
                if sc[key] is None or sr[key] is None:
                    continue
                out.append({"scenario": scen, "flavor": flavor, "source": source,
                            "concurrency": conc, "pair": f"{cand} / {ref}", "metric": name,
                            "cand": sc[key], "ref": sr[key], "unit": unit,
                            "ratio": _ratio(sc[key], sr[key]), "n": "-", "p": None})
    return out


def _headline_section(runs: Sequence[Run]) -> list[rd.Block]:
    rows_h = headline(runs)
    blocks: list[rd.Block] = [rd.Heading("Headline comparison")]
    if not rows_h:
        blocks.append(rd.Para("No two chains ran the same scenario, flavor and source: nothing "
                              "to compare.", emphasis=True))
        return blocks
    bullets = []
    for h in rows_h:
        if h["metric"].startswith("RunPodSandbox") and h["ratio"] is not None:
            cand, ref = h["pair"].split(" / ")
            verdict = "faster" if h["ratio"] < 1 else "slower"
            sig = "significant" if h["p"] < 0.01 else "not significant"
            bullets.append(
                f"{h['scenario']} ({h['flavor']}, {h['source']}, c={h['concurrency']}): "
                f"{cand} RunPodSandbox p50 is {h['ratio']:.2f}x {ref} "
                f"({h['cand']:.3g} vs {h['ref']:.3g} ms, {verdict}; permutation p={h['p']:.2g}, "
                f"{sig} at 0.01; n={h['n']}).")
    if bullets:
        blocks.append(rd.Bullets(bullets))
    headers = ["scenario", "flavor", "source", "conc", "pair", "metric", "candidate",
               "reference", "unit", "ratio", "n", "p (perm.)"]
    rows = [[h["scenario"], h["flavor"], h["source"], h["concurrency"], h["pair"], h["metric"],
             h["cand"], h["ref"], h["unit"], h["ratio"], h["n"], h["p"]] for h in rows_h]
    blocks.append(rd.Table(headers, rows, align_right_from=6))
    return blocks


def _steps_section(runs: Sequence[Run]) -> list[rd.Block]:
    with_spans = [r for r in runs if not smp.step_durations(r).empty]
    if not with_spans:
        return []
    order = smp.merged_step_order(with_spans)
    headers = ["step", *[_run_id(r) for r in with_spans]]
    rows = []
    for step in order:
        row: list[Any] = [step]
        for r in with_spans:
            d = smp.step_durations(r)
            col = f"step:{step}"
            if col in d.columns:
                v = d[col].dropna().to_numpy() * 1e3
                row.append(f"{np.median(v):.3g} / {np.percentile(v, 95):.3g}")
            else:
                row.append("-")
        rows.append(row)
    return [rd.Heading("RunPodSandbox steps (p50 / p95 ms)"), rd.Table(headers, rows)]


def _sim_section(runs: Sequence[Run]) -> list[rd.Block]:
    pairs = figs.sim_pairs(runs)
    if not pairs:
        return []
    headers = ["scenario", "chain/flavor", "conc", "measured p50 ms", "sim p50 ms", "p50 error",
               "measured p95 ms", "sim p95 ms", "p95 error"]
    rows = []
    for b, s in pairs:
        vb, vs = smp.sample(b, "run_pod_sandbox") * 1e3, smp.sample(s, "run_pod_sandbox") * 1e3
        if not vb.size or not vs.size:
            continue
        row: list[Any] = [b.meta.scenario, f"{b.meta.chain}/{b.meta.flavor}", b.meta.concurrency]
        for q in (50, 95):
            mb, ms = float(np.percentile(vb, q)), float(np.percentile(vs, q))
            row += [mb, ms, f"{(ms - mb) / mb:+.1%}" if mb else "-"]
        rows.append(row)
    return [rd.Heading("Simulated vs measured (RunPodSandbox)"),
            rd.Table(headers, rows, align_right_from=2)]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in s).strip("-") or "x"


def _figure_blocks(runs: Sequence[Run]) -> list[rd.Block]:
    blocks: list[rd.Block] = [rd.Heading("Figures")]
    by_scen: dict[str, list[Run]] = {}
    for r in runs:
        by_scen.setdefault(r.meta.scenario, []).append(r)
    multi = len(by_scen) > 1
    jobs: list[tuple[str, str, Callable[[], Any]]] = []
    for scen, rs in sorted(by_scen.items()):
        sfx = f"-{_slug(scen)}" if multi else ""
        on = f" — {scen}" if multi else ""
        bench = [r for r in rs if r.meta.source == "bench"] or rs
        jobs += [
            (f"RunPodSandbox latency CDF{on}", f"cdf-run-pod{sfx}.png",
             lambda rs=rs: figs.latency_cdf(rs)),
            (f"CreateContainer+StartContainer latency CDF{on}", f"cdf-create-start{sfx}.png",
             lambda rs=rs: figs.latency_cdf(rs, metric="create_start")),
            (f"Step waterfall of the median pod{on}", f"waterfall{sfx}.png",
             lambda bench=bench: figs.step_waterfall(bench)),
            (f"Management memory and processes vs live pods{on}", f"memory{sfx}.png",
             lambda bench=bench: figs.memory_vs_pods(bench)),
        ]
    concs: dict[tuple, set[int]] = {}
    for r in runs:
        concs.setdefault((r.meta.chain, r.meta.flavor, r.meta.source), set()).add(
            r.meta.concurrency)
    if any(len(c) > 1 for c in concs.values()):
        jobs.append(("Throughput vs concurrency", "throughput.png",
                     lambda: figs.throughput_vs_concurrency(runs)))
    if figs.sim_pairs(runs):
        jobs.append(("Simulated vs measured", "sim-vs-measured.png",
                     lambda: figs.sim_vs_measured(runs)))
    skipped = []
    for title, fname, make in jobs:
        try:
            fig = make()
        except ValueError as exc:  # nothing to draw for these runs
            skipped.append(f"{title}: {exc}")
            continue
        blocks.append(rd.Figure(title, fname, figs.png_bytes(fig)))
    if skipped:
        blocks.append(rd.Para("Skipped: " + "; ".join(skipped) + ".", emphasis=True))
    return blocks


def build_report_from_runs(runs: Sequence[Run], out_dir: str | Path, title: str | None = None,
                           inputs: Sequence[str] = ()) -> Path:
    """Write report.md, report.html, the PNGs and summary.json into out_dir; return out_dir."""
    if not runs:
        raise ValueError("no runs to report on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = figs.ordered_runs(runs)
    summaries = [summarize(r) for r in runs]
    scen = sorted({r.meta.scenario for r in runs})
    title = title or f"chainbench report — {', '.join(scen)}"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[rd.Block] = [
        rd.Para(f"Generated {now} from {len(runs)} run(s)"
                + (f": {', '.join(inputs)}" if inputs else "") + "."),
    ]
    blocks += _host_section(runs)
    blocks += _quality_section(runs)
    blocks += _headline_section(runs)
    blocks += _summary_section(summaries)
    blocks += _steps_section(runs)
    blocks += _sim_section(runs)
    blocks += _figure_blocks(runs)
    for b in blocks:
        if isinstance(b, rd.Figure):
            (out / b.filename).write_bytes(b.png)
    (out / "report.md").write_text(rd.to_markdown(title, blocks))
    (out / "report.html").write_text(rd.to_html(title, blocks))
    (out / "summary.json").write_text(json.dumps({"runs": summaries}, indent=2) + "\n")
    return out


def build_report(paths: Sequence[str | Path], out_dir: str | Path,
                 title: str | None = None) -> Path:
    """Load the run directories at or below `paths` and write the report; return out_dir."""
    return build_report_from_runs(load_runs(paths), out_dir, title,
                                  inputs=[str(p) for p in paths])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="chainbench report",
                                 description="Write report.md, a self-contained report.html "
                                             "and PNG figures from run directories.")
    ap.add_argument("dirs", nargs="+", help="run directories (or directories holding runs)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory ({DEFAULT_OUT})")
    ap.add_argument("--title", default=None)
    try:
        ns = ap.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    try:
        out = build_report(ns.dirs, ns.out, ns.title)
    except (ValueError, OSError) as exc:  # SchemaError is a ValueError
        print(f"chainbench report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'report.md'}, {out / 'report.html'}")
    return 0
