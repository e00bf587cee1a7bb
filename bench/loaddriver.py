"""Owns: `chainbench bench` — the CRI load driver that runs a scenario on real chains.

    chainbench bench SCENARIO --chain shim,sandbox,containerd --out DIR
                     [--schema legacy|current] [--pods N] [--concurrency C]
                     [--variant NAME=TREE ... [--variant-env NAME:KEY=VALUE ...]]
    chainbench bench rpc ...            (RPC round trips: bench.rpcbench)

How the load is shaped (DESIGN §5, "compare as ratios inside one run"):
* every chain's daemons are up for the whole session;
* pods are started in *blocks*; each block runs on every chain in turn (A B C, then B C A, ...),
  so slow drift of the machine (page cache, thermal, a background job) lands on all chains
  alike, and the rotation keeps any "goes first after a pause" effect from favouring one chain.
  Whole-repetition alternation was rejected: on a 2-core machine a repetition lasts minutes and
  drift within it would not cancel.  A block never crosses a memory point, so at each point
  every chain holds exactly that many live pods when its processes are sampled (a block cut
  short by a point runs fewer pods at once than the concurrency);
* all pods stay alive until the ramp completes; then all are stopped and removed, in blocks
  interleaved the same way, timing stop+remove per pod.
With `--variant NAME=TREE` (two or more) the session compares code revisions (`chainbench ab`):
each (variant, chain) is a *lane* whose daemons run that tree's code with that variant's extra
environment, and lanes take the chains' place in the rotation — per block, the chains in
rotating order, each chain's variants back to back in rotating order (A B, then B A), so two
variants of a chain meet the same machine state seconds apart.  The client and probes are this
checkout's.  Output is then DIR/<variant>/<chain>/.  Every pod records its block index
(pods table column `block`): the gate permutes labels only within a block.
Because chains take turns, the pods table's `submit_s`/`ready_s` use a *chain-active clock*
(seconds during which that chain's own blocks ran, from the run start): throughput figures then
describe the chain, not the chain diluted by the others' turns.  Wall-clock offsets from the run
start are kept as `submit_wall_s`/`ready_wall_s`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.chains import MAX_RUN_ROOT, Chain, make_chain, remove_run_base, run_leftovers
from bench.cri_client import CriClient, CriError, container_config, pod_config
from bench.loadoptions import Options, parse_args
from bench.probes import (accel_mode, cgroup_cpu, cpu_children_seconds, cpu_seconds,
                          process_table, read_memory, read_threads, scope_processes,
                          tool_versions)
from bench.statefs import MOUNTED, mount_tmpfs
from bench.variants import Variant
from reports.schema import HostFacts, RunMeta, write_run
from scenarios.loader import ScenarioError

DAEMON_ROLES = ("engine", "sandboxer", "containerd")
# Per-pod processes that live alone in their container's cgroup: their CPU is read from the
# cgroup's ns-precise accounting (probes.cgroup_cpu), not from tick-rounded /proc/PID/stat.
# run.json extra "cpu_exact_roles" says which roles were read so (sim.calibration then adds no
# rounding back).
CGROUP_CPU_ROLES = ("pause", "container")


def _now() -> int:
    return time.perf_counter_ns()


@dataclass
class PodRecord:
    index: int
    name: str
    uid: str
    warmup: bool
    sandbox_id: str = ""
    container_ids: list[str] = field(default_factory=list)
    submit_ns: int = 0
    ready_ns: int = 0
    submit_chain_s: float = math.nan
    ready_chain_s: float = math.nan
    latency_s: float = math.nan
    create_start_s: float = math.nan
    stop_remove_s: float = math.nan
    error: str = ""
    removed: bool = False
    block: int = -1  # index in Bench.blocks() of the ramp block that started it


@dataclass
class ChainLoad:
    """One lane's (a chain, or a variant's chain) client, pods and chain-active clock."""

    chain: Chain
    client: CriClient
    pods: list[PodRecord]
    variant: Variant | None = None
    active_ns: int = 0
    _block_start: int = 0
    memory: list[dict[str, Any]] = field(default_factory=list)
    cpu_start: dict[int, float] = field(default_factory=dict)
    cpu_children_start: dict[int, float] = field(default_factory=dict)
    cpu_rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    cpu_exact_roles: set[str] = field(default_factory=set)
    # CPU seconds the driver itself (CRI client: request encoding, gRPC, tracing) burned during
    # this lane's ramp blocks.  It shares the node's cores with the chain, so calibration
    # needs its size (sim.calibration.CLIENT_ROLE); lanes' blocks never overlap, so the
    # process-wide clock splits exactly by lane.
    client_cpu_s: float = 0.0
    spans: list[dict[str, Any]] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)

    def clock_s(self, t_ns: int) -> float:
        return (self.active_ns + (t_ns - self._block_start)) / 1e9

    def alive(self) -> int:
        return sum(1 for p in self.pods if p.sandbox_id and not p.removed)

    def errors(self) -> int:
        return sum(1 for p in self.pods if p.error)

    @property
    def lane(self) -> str:
        v = self.variant
        return self.chain.name if v is None else f"{v.name}/{self.chain.name}"


class Bench:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.sc = opts.scenario
        self.run_id = secrets.token_hex(4)
        self.run_base = opts.run_root / self.run_id
        self.t0 = _now()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.loads: dict[str, ChainLoad] = {}
        self.interrupted = False
        self.leftovers: list[str] = []
        self.forced: list[str] = []
        self.run_dir_fs = ""

    # -- progress --------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"[{(_now() - self.t0) / 1e9:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- set-up ----------------------------------------------------------------------------------
    async def start_chains(self) -> None:
        self.run_base.mkdir(parents=True, exist_ok=True)
        self.run_dir_fs = mount_tmpfs(self.run_base)
        if self.run_dir_fs not in (MOUNTED, "tmpfs"):
            self.say(f"warning: run dir on {self.run_dir_fs}: file metadata stalls of that "
                     "filesystem will show in the timings (bench.statefs)")
        vidx = {v.name: i for i, v in enumerate(self.o.variants)}
        for variant, name in self.o.lanes():
            chain = make_chain(name, self.run_base, self.run_id, schema=self.o.schema,
                               flavor=self.sc.flavor, boot=self.sc.boot,
                               vm_pool=self.sc.vm_pool, vm_pool_mode=self.sc.vm_pool_mode,
                               variant_index=None if variant is None else vidx[variant.name],
                               code_tree=None if variant is None else variant.tree,
                               extra_env=None if variant is None else variant.env)
            tag = name if variant is None else f"{variant.name}-{name}"
            pods = [PodRecord(index=i, name=f"{name}-{i:04d}", uid=f"{self.run_id}-{tag}-{i}",
                              warmup=i < self.sc.warmup_pods) for i in range(self.sc.pods)]
            ld = ChainLoad(chain=chain, client=CriClient(chain.endpoint), pods=pods,
                           variant=variant)
            self.loads[ld.lane] = ld
            t = _now()
            await chain.start()
            self.say(f"{ld.lane}: up in {(_now() - t) / 1e9:.2f}s at {chain.endpoint}")
            for pid in chain.daemons():
                ld.cpu_start[pid] = cpu_seconds(pid) or 0.0
                ld.cpu_children_start[pid] = cpu_children_seconds(pid) or 0.0

    # -- one pod ---------------------------------------------------------------------------------
    async def start_pod(self, ld: ChainLoad, rec: PodRecord) -> None:
        c, ch = ld.client, ld.chain
        cfg = pod_config(rec.name, rec.uid, cgroup_parent=ch.cgroup_parent)
        rec.submit_ns = _now()
        rec.submit_chain_s = ld.clock_s(rec.submit_ns)
        try:
            rec.sandbox_id = await c.run_pod_sandbox(cfg, ch.handler, pod=rec.name)
            rec.ready_ns = _now()
            rec.ready_chain_s = ld.clock_s(rec.ready_ns)
            rec.latency_s = (rec.ready_ns - rec.submit_ns) / 1e9
            t = _now()
            for k in range(self.sc.containers_per_pod):
                ccfg = container_config(f"c{k}", ch.image, list(self.sc.container.command))
                cid = await c.create_container(rec.sandbox_id, ccfg, cfg, pod=rec.name)
                rec.container_ids.append(cid)
                await c.start_container(cid, pod=rec.name)
            rec.create_start_s = (_now() - t) / 1e9
        except CriError as exc:
            rec.error = str(exc)
            self.say(f"{ch.name}: {rec.name} failed: {exc}")

    async def stop_pod(self, ld: ChainLoad, rec: PodRecord) -> None:
        c = ld.client
        t = _now()
        errs: list[str] = []
        for cid in rec.container_ids:
            for step in (lambda: c.stop_container(cid, self.o.stop_timeout_s, pod=rec.name),
                         lambda: c.remove_container(cid, pod=rec.name)):
                try:
                    await step()
                except CriError as exc:
                    errs.append(str(exc))
        if rec.sandbox_id:
            for step in (lambda: c.stop_pod_sandbox(rec.sandbox_id, pod=rec.name),
                         lambda: c.remove_pod_sandbox(rec.sandbox_id, pod=rec.name)):
                try:
                    await step()
                except CriError as exc:
                    errs.append(str(exc))
        rec.removed = True
        if errs:
            rec.error = (rec.error + "; " if rec.error else "") + "teardown: " + "; ".join(errs)
            self.say(f"{ld.chain.name}: {rec.name} teardown failed: {errs[0]}")
        elif rec.sandbox_id:
            rec.stop_remove_s = (_now() - t) / 1e9

    # -- blocks ------------------------------------------------------------------------------------
    async def run_block(self, ld: ChainLoad, recs: list[PodRecord], stop: bool) -> None:
        sem = asyncio.Semaphore(self.sc.concurrency)

        async def one(r: PodRecord) -> None:
            async with sem:
                await (self.stop_pod(ld, r) if stop else self.start_pod(ld, r))

        ld._block_start = _now()
        cpu0 = time.process_time()
        try:
            await asyncio.gather(*(one(r) for r in recs))
        finally:
            ld.active_ns += _now() - ld._block_start
            if not stop:
                ld.client_cpu_s += time.process_time() - cpu0

    def blocks(self) -> list[tuple[list[int], bool]]:
        """(pod indices, sample memory after it) — blocks never cross a memory point."""
        points = sorted(set(self.sc.memory_points()) | {self.sc.pods})
        out: list[tuple[list[int], bool]] = []
        lo = 0
        for p in points:
            while lo < p:
                hi = min(p, lo + self.o.block)
                out.append((list(range(lo, hi)), hi == p and p in self.sc.memory_points()))
                lo = hi
        return out

    def order(self, k: int) -> list[ChainLoad]:
        lds = list(self.loads.values())
        if not self.o.variants:
            k %= len(lds)
            return lds[k:] + lds[:k]
        # Chains rotate; each chain's variants run back to back, also rotating (A B, B A, ...),
        # so the variants compared with each other meet nearly the same machine state.
        chains = list(dict.fromkeys(ld.chain.name for ld in lds))
        names = [v.name for v in self.o.variants]
        c, v = k % len(chains), k % len(names)
        by = {(ld.chain.name, ld.variant.name if ld.variant else ""): ld for ld in lds}
        return [by[(ch, vn)] for ch in chains[c:] + chains[:c] for vn in names[v:] + names[:v]
                if (ch, vn) in by]

    async def ramp(self) -> None:
        total = self.sc.pods
        if 0 in self.sc.memory_points():
            self.sample_memory()
        for k, (idx, sample) in enumerate(self.blocks()):
            for ld in self.order(k):
                for i in idx:
                    ld.pods[i].block = k
                await self.run_block(ld, [ld.pods[i] for i in idx], stop=False)
                self.say(f"{ld.lane}: ramp {idx[-1] + 1}/{total} pods, "
                         f"{ld.alive()} alive, {ld.errors()} errors")
            if sample:
                self.sample_memory()
        self.sample_cpu(final=False)

    async def teardown(self) -> None:
        """Stop+remove every pod, interleaved like the ramp; then sweep what CRI still lists."""
        n = self.sc.pods
        for k, lo in enumerate(range(0, n, self.o.block)):
            for ld in self.order(k):
                recs = [r for r in ld.pods[lo:lo + self.o.block] if not r.removed]
                if recs:
                    await self.run_block(ld, recs, stop=True)
                    self.say(f"{ld.lane}: teardown {min(lo + self.o.block, n)}/{n}")
        for ld in self.loads.values():
            if ld.chain.started:
                await self.cri_sweep(ld)

    async def cri_sweep(self, ld: ChainLoad) -> None:
        """Remove anything the runtime still knows (a pod whose reply we never got, ...)."""
        ld.forced += await ld.client.remove_everything()

    # -- probes ------------------------------------------------------------------------------------
    def sample_memory(self) -> None:
        table = process_table()
        t_s = (_now() - self.t0) / 1e9
        for ld in self.loads.values():
            alive = ld.alive()
            for pid, (_info, role) in scope_processes(ld.chain.scope(), table).items():
                mem = read_memory(pid)
                if mem is None:
                    continue
                ld.memory.append({"t_s": t_s, "role": role, "pid": pid, "rss": mem.rss,
                                  "pss": mem.pss, "uss": mem.uss, "threads": read_threads(pid),
                                  "pods_alive": alive})
        self.say("memory sampled: " + ", ".join(
            f"{n}={ld.alive()} pods" for n, ld in self.loads.items()))

    def sample_cpu(self, final: bool) -> None:
        """Per-pod processes at the end of the ramp (they die in teardown); daemons at the end,
        minus their CPU before the first pod (containerd's image import is not load)."""
        table = process_table()
        for ld in self.loads.values():
            seen: set[str] = set()
            for pid, (_info, role) in scope_processes(ld.chain.scope(), table).items():
                if final and role not in DAEMON_ROLES:
                    continue
                exact = cgroup_cpu(pid) if role in CGROUP_CPU_ROLES else None
                if exact is not None:
                    # One row per cgroup: a second process of one container is in its total.
                    group, used = exact
                    ld.cpu_rows[pid] = {"role": role, "pid": pid,
                                        "cpu_s": 0.0 if group in seen else round(used, 6),
                                        "cpu_children_s": 0.0}
                    seen.add(group)
                    ld.cpu_exact_roles.add(role)
                    continue
                cs = cpu_seconds(pid)
                if cs is None:
                    continue
                cs -= ld.cpu_start.get(pid, 0.0)
                ch = (cpu_children_seconds(pid) or 0.0) - ld.cpu_children_start.get(pid, 0.0)
                ld.cpu_rows[pid] = {"role": role, "pid": pid, "cpu_s": round(cs, 4),
                                    "cpu_children_s": round(ch, 4)}

    # -- results -----------------------------------------------------------------------------------
    def pod_rows(self, ld: ChainLoad) -> list[dict[str, Any]]:
        rows = []
        for r in ld.pods:
            if not r.submit_ns:
                continue  # never submitted (interrupted run)
            err = r.error
            if not err and (not r.ready_ns or math.isnan(r.create_start_s)):
                err = "interrupted before the pod was up"
            rows.append({
                "pod": r.name, "submit_s": r.submit_chain_s, "ready_s": r.ready_chain_s,
                "latency_s": r.latency_s, "create_start_s": r.create_start_s,
                "stop_remove_s": r.stop_remove_s, "outcome": "error" if err else "ok",
                "error": err, "warmup": r.warmup, "sandbox_id": r.sandbox_id,
                "submit_wall_s": (r.submit_ns - self.t0) / 1e9, "block": r.block,
                "ready_wall_s": (r.ready_ns - self.t0) / 1e9 if r.ready_ns else math.nan,
            })
        return rows

    def span_rows(self, ld: ChainLoad, traced: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Testbed processes may key spans by sandbox or container id: map those to pod names.
        names: dict[str, str] = {}
        for r in ld.pods:
            names[r.name] = r.name
            if r.sandbox_id:
                names[r.sandbox_id] = r.name
            for cid in r.container_ids:
                names[cid] = r.name
        rows = [dict(s) for s in ld.client.spans]
        for s in traced:
            s = dict(s)
            s["pod"] = names.get(str(s.get("pod", "")), str(s.get("pod", "")))
            rows.append(s)
        return rows

    def _pool_meta(self, ld: ChainLoad) -> dict[str, Any]:
        """The sandboxer's VM pool as this lane ran it (the scenario's, else its env's)."""
        if self.sc.flavor != "microvm" or ld.chain.name != "sandbox":
            return {}
        from bench.sandboxer.vms import pool_mode_from_env, pool_size_from_env
        if self.sc.vm_pool:  # the scenario's pool is passed as flags and wins over the env
            return {"vm_pool": self.sc.vm_pool, "vm_pool_mode": self.sc.vm_pool_mode}
        env = {**os.environ, **(ld.variant.env if ld.variant else {})}
        size = pool_size_from_env(env)
        return {"vm_pool": size, "vm_pool_mode": pool_mode_from_env(env) if size else ""}

    def write(self, traced: dict[str, list[dict[str, Any]]]) -> None:
        versions = tool_versions()
        host = HostFacts.collect(accel=accel_mode() if self.sc.flavor == "microvm" else "",
                                 versions=versions)
        for ld in self.loads.values():
            name, v = ld.chain.name, ld.variant
            variant = {} if v is None else {
                "variant": v.name, "tree": str(v.tree), "commit": v.commit,
                "variant_env": dict(v.env),
                "variants_in_session": [x.name for x in self.o.variants]}
            meta = RunMeta(
                scenario=self.sc.name, source="bench", chain=name, flavor=self.sc.flavor,
                scenario_digest=self.sc.digest, pods=self.sc.pods,
                concurrency=self.sc.concurrency, containers_per_pod=self.sc.containers_per_pod,
                warmup_pods=self.sc.warmup_pods, t0_ns=self.t0, started_at=self.started_at,
                host=host,
                extra={"run_id": self.run_id, "chains_in_session": list(self.o.chains),
                       "lanes_in_session": list(self.loads), **variant,
                       "interleave": "blocks, rotating chain order", "block": self.o.block,
                       "clock": "chain-active (submit_s/ready_s); wall in submit_wall_s",
                       "memory_points": list(self.sc.memory_points()),
                       "run_dir_fs": self.run_dir_fs,
                       "stop_timeout_s": self.o.stop_timeout_s,
                       "schema": self.o.schema if name == "sandbox" else "",
                       "boot": self.sc.boot if self.sc.flavor == "microvm" else "",
                       **self._pool_meta(ld),
                       "cpu_exact_roles": sorted(ld.cpu_exact_roles),
                       "interrupted": self.interrupted, "forced_cleanup": ld.forced,
                       "run_forced_cleanup": self.forced, "leftovers": self.leftovers},
            )
            write_run(self.o.lane_out(v, name), meta, pods=self.pod_rows(ld),
                      spans=self.span_rows(ld, traced.get(ld.lane, [])), memory=ld.memory,
                      cpu=list(ld.cpu_rows.values()) + [self.client_cpu_row(ld)])

    @staticmethod
    def client_cpu_row(ld: ChainLoad) -> dict[str, Any]:
        """The driver's own CPU in the lane's ramp (role "client"; start phase like per-pod
        processes).  process_time() is ns-precise, unlike /proc ticks: no truncation to undo."""
        return {"role": "client", "pid": os.getpid(), "cpu_s": round(ld.client_cpu_s, 6),
                "cpu_children_s": 0.0}


async def _stop_all(b: Bench) -> dict[str, list[dict[str, Any]]]:
    """Stop daemons, collect their spans, force-clean; runs even after Ctrl-C or errors."""
    traced: dict[str, list[dict[str, Any]]] = {}
    for name, ld in b.loads.items():
        await ld.client.close()
        logs = b.o.lane_out(ld.variant, ld.chain.name) / "logs"
        try:
            forced = await ld.chain.stop(keep_logs=logs)
        except Exception as exc:
            forced = [f"stop failed: {exc!r}"]
        traced[name] = [dict(s) for s in ld.chain.spans]
        for log in sorted(logs.glob("*.log")):
            bad = sum(1 for line in log.read_text(errors="replace").splitlines()
                      if " ERROR " in line or line.startswith("Traceback"))
            if bad:
                b.say(f"{name}: {bad} error line(s) in {log}")
        ld.forced += forced
        if forced:
            b.say(f"{name}: forced cleanup: {forced}")
    b.forced += await asyncio.to_thread(remove_run_base, b.run_base, b.run_id)
    b.leftovers = run_leftovers(b.run_base, b.run_id)
    for ld in b.loads.values():
        b.leftovers += [x for x in ld.chain.leftovers() if x not in b.leftovers]
    return traced


async def run_bench(opts: Options) -> int:
    b = Bench(opts)
    loop = asyncio.get_running_loop()
    work = asyncio.ensure_future(_load(b))
    phase = {"task": work}

    def on_signal() -> None:
        # 1st Ctrl-C: stop the load and tear down over CRI; 2nd: skip CRI, go to the kill sweep.
        first = not b.interrupted
        b.interrupted = True
        b.say("interrupted: tearing down over CRI (Ctrl-C again to skip to the kill sweep)"
              if first else "interrupted again: skipping what is left of the CRI teardown")
        phase["task"].cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    failure: BaseException | None = None
    try:
        try:
            await work
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            failure = exc
            b.say(f"run failed: {exc!r}")
        if any(ld.chain.started for ld in b.loads.values()):
            td = asyncio.ensure_future(b.teardown())
            phase["task"] = td
            try:
                await td
            except asyncio.CancelledError:
                b.say("CRI teardown skipped")
            except Exception as exc:
                b.say(f"CRI teardown failed: {exc!r}")
            b.sample_cpu(final=True)
        phase["task"] = asyncio.ensure_future(asyncio.sleep(0))  # nothing left to cancel
        traced = await asyncio.shield(_stop_all(b))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if b.loads and any(ld.pods[0].submit_ns for ld in b.loads.values()):
        b.write(traced)
    if b.leftovers:
        b.say(f"LEFTOVERS after run: {b.leftovers}")
    else:
        b.say("clean: no leftover process, mount, namespace file, cgroup or socket")
    if b.interrupted:
        return 130
    if failure is not None:
        return 1
    _print_summary(opts)
    dead = [n for n, ld in b.loads.items() if ld.pods and all(p.error for p in ld.pods)]
    if dead:
        b.say(f"every pod failed on {dead}: see the logs dir of each run dir in {opts.out}")
    return 1 if b.leftovers or dead else 0


async def _load(b: Bench) -> None:
    b.say(f"scenario {b.sc.name}: {b.sc.pods} pods ({b.sc.warmup_pods} warm-up), concurrency "
          f"{b.sc.concurrency}, chains {b.o.chains}, run dir {b.run_base}"
          + "".join(f", variant {v.name}={v.tree}{' ' + str(v.env) if v.env else ''}"
                    for v in b.o.variants))
    await b.start_chains()
    await b.ramp()


def _print_summary(opts: Options) -> None:
    from reports.summary import render_table, summarize_paths

    summary = summarize_paths([str(opts.lane_out(v, c)) for v, c in opts.lanes()])
    if opts.json:
        import json
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(render_table(summary))


def main(argv: list[str]) -> int:
    if argv and argv[0] == "rpc":
        from bench import rpcbench
        return int(rpcbench.main(argv[1:]) or 0)
    try:
        opts = parse_args(argv)
    except ScenarioError as exc:
        print(f"chainbench bench: {exc}", file=sys.stderr)
        return 2
    if len(str(opts.run_root)) > MAX_RUN_ROOT:
        print(f"chainbench bench: --run-root longer than {MAX_RUN_ROOT} characters: socket "
              "paths below it would not fit AF_UNIX", file=sys.stderr)
        return 2
    if opts.scenario.flavor == "microvm":
        from bench.chains import prepare_vm_assets

        def say(msg: str) -> None:
            print(f"[prepare] {msg}", file=sys.stderr, flush=True)
        try:
            prepare_vm_assets(say)
        except Exception as exc:  # no kernel source, a template that would not boot, ...
            print(f"chainbench bench: microvm assets: {exc}", file=sys.stderr)
            return 1
    return asyncio.run(run_bench(opts))
