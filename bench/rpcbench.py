"""Owns: the RPC hot-path benchmark: ttrpc (ours) vs grpc.aio unary round trips on unix sockets.

`chainbench bench rpc [--json] [--calls N] [--payload BYTES] [--concurrency C]`

Both servers and both clients live in one process and one event loop, on unix sockets in a
temp dir, serving the same echo method on the same protobuf message (BytesValue), so the only
difference is the RPC stack. Round trips are measured interleaved (ttrpc batch, grpc batch,
with the order flipped every round) after a warm-up, so machine drift hits both sides alike
(DESIGN §5). Throughput is measured separately with `--concurrency` calls in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

from google.protobuf.wrappers_pb2 import BytesValue

SERVICE = "chainbench.bench.Echo"
METHOD = "Echo"


@dataclass
class RpcBenchConfig:
    calls: int = 2000  # measured sequential round trips per stack
    payload: int = 64  # bytes in the echoed message
    concurrency: int = 16  # in-flight calls for the throughput phase
    warmup: int = 200  # per stack, excluded from the samples
    batch: int = 100  # calls per interleaved batch


@dataclass
class Percentiles:
    p50: float
    p95: float
    p99: float
    mean: float
    cv: float  # stdev / mean of the samples


@dataclass
class RpcBenchResult:
    ttrpc_rtt_us: Percentiles
    grpc_rtt_us: Percentiles
    ttrpc_calls_per_s: float
    grpc_calls_per_s: float
    ratio_p50: float  # ttrpc / grpc; < 1 means ttrpc is faster
    samples: int
    warmup: int
    payload: int
    concurrency: int
    python: str = field(default_factory=lambda: sys.version.split()[0])

    def to_json(self) -> dict:
        return asdict(self)


def _percentiles(samples_ns: list[int]) -> Percentiles:
    us = sorted(s / 1000.0 for s in samples_ns)
    n = len(us)

    def q(p: float) -> float:
        # nearest-rank on the sorted raw samples; no interpolation games
        return us[min(n - 1, max(0, int(round(p * (n - 1)))))]

    mean = statistics.fmean(us)
    cv = statistics.pstdev(us) / mean if mean else 0.0
    return Percentiles(round(q(0.50), 2), round(q(0.95), 2), round(q(0.99), 2),
                       round(mean, 2), round(cv, 3))


Call = Callable[[], Awaitable[object]]


async def _timed_batch(call: Call, n: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await call()
        out.append(clock() - t0)


async def _throughput(call: Call, total: int, concurrency: int) -> float:
    per_worker, extra = divmod(total, concurrency)

    async def worker(k: int) -> None:
        for _ in range(k):
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(per_worker + (1 if i < extra else 0))
                           for i in range(concurrency)))
    return total / (time.perf_counter() - t0)


async def _start_ttrpc(path: str):
    from bench.rpc.ttrpc import Client, Server

    async def echo(req: BytesValue, ctx: object) -> BytesValue:
        return req

    server = Server()
    server.register(SERVICE, {METHOD: (BytesValue, BytesValue, echo)})
    await server.start(path)
    client = await Client.connect(f"unix://{path}")
    return server, client


async def _start_grpc(path: str):
    import grpc

    async def echo(req: BytesValue, context: object) -> BytesValue:
        return req

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=BytesValue.FromString,
            response_serializer=BytesValue.SerializeToString),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix://{path}")
    stub = channel.unary_unary(f"/{SERVICE}/{METHOD}",
                               request_serializer=BytesValue.SerializeToString,
                               response_deserializer=BytesValue.FromString)
    await channel.channel_ready()
    return server, channel, stub


async def run(cfg: RpcBenchConfig) -> RpcBenchResult:
    msg = BytesValue(value=b"x" * cfg.payload)
    with tempfile.TemporaryDirectory(prefix="chainbench-rpc-") as tmp:
        t_server, t_client = await _start_ttrpc(os.path.join(tmp, "ttrpc.sock"))
        g_server, g_channel, g_stub = await _start_grpc(os.path.join(tmp, "grpc.sock"))
        try:
            def ttrpc_call() -> Awaitable[object]:
                return t_client.call(SERVICE, METHOD, msg, BytesValue)

            def grpc_call() -> Awaitable[object]:
                return g_stub(msg)

            # Sanity: both echo the same bytes before we time anything.
            assert (await ttrpc_call()) == msg and (await grpc_call()) == msg
            sink: list[int] = []
            await _timed_batch(ttrpc_call, cfg.warmup, sink)
            await _timed_batch(grpc_call, cfg.warmup, sink)

            t_ns: list[int] = []
            g_ns: list[int] = []
            rounds, rest = divmod(cfg.calls, cfg.batch)
            sizes = [cfg.batch] * rounds + ([rest] if rest else [])
            for i, n in enumerate(sizes):
                order = [(ttrpc_call, t_ns), (grpc_call, g_ns)]
                if i % 2:
                    order.reverse()  # ABBA: neither stack always runs second
                for call, out in order:
                    await _timed_batch(call, n, out)

            # Throughput: two interleaved halves each, rates averaged by total time.
            half = max(cfg.concurrency, cfg.calls // 2)
            t_rates, g_rates = [], []
            for _ in range(2):
                t_rates.append(await _throughput(ttrpc_call, half, cfg.concurrency))
                g_rates.append(await _throughput(grpc_call, half, cfg.concurrency))
        finally:
            await t_client.close()
            await t_server.close()
            await g_channel.close()
            await g_server.stop(None)

    t_p, g_p = _percentiles(t_ns), _percentiles(g_ns)
    # harmonic mean of rates = total calls / total time for equal-sized runs
    t_rate = len(t_rates) / sum(1 / r for r in t_rates)
    g_rate = len(g_rates) / sum(1 / r for r in g_rates)
    return RpcBenchResult(
        ttrpc_rtt_us=t_p, grpc_rtt_us=g_p,
        ttrpc_calls_per_s=round(t_rate, 1), grpc_calls_per_s=round(g_rate, 1),
        ratio_p50=round(t_p.p50 / g_p.p50, 3) if g_p.p50 else float("nan"),
        samples=len(t_ns), warmup=cfg.warmup, payload=cfg.payload,
        concurrency=cfg.concurrency)


def _table(r: RpcBenchResult) -> str:
    rows = [("", "ttrpc", "grpc.aio"),
            ("rtt p50 (us)", f"{r.ttrpc_rtt_us.p50:.1f}", f"{r.grpc_rtt_us.p50:.1f}"),
            ("rtt p95 (us)", f"{r.ttrpc_rtt_us.p95:.1f}", f"{r.grpc_rtt_us.p95:.1f}"),
            ("rtt p99 (us)", f"{r.ttrpc_rtt_us.p99:.1f}", f"{r.grpc_rtt_us.p99:.1f}"),
            ("rtt cv", f"{r.ttrpc_rtt_us.cv:.2f}", f"{r.grpc_rtt_us.cv:.2f}"),
            (f"calls/s (c={r.concurrency})", f"{r.ttrpc_calls_per_s:.0f}",
             f"{r.grpc_calls_per_s:.0f}")]
    w0 = max(len(a) for a, _, _ in rows)
    lines = [f"{a.ljust(w0)}  {b:>10}  {c:>10}" for a, b, c in rows]
    lines.append(f"ratio p50 ttrpc/grpc = {r.ratio_p50:.3f}   "
                 f"({r.samples} samples per stack after {r.warmup} warm-up calls, "
                 f"payload {r.payload} B)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chainbench bench rpc",
                                 description="ttrpc vs grpc.aio unary round trips on unix sockets")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--calls", type=int, default=RpcBenchConfig.calls,
                    help="measured round trips per stack (default %(default)s)")
    ap.add_argument("--payload", type=int, default=RpcBenchConfig.payload,
                    help="bytes echoed per call (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=RpcBenchConfig.concurrency,
                    help="calls in flight for calls/s (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=RpcBenchConfig.warmup,
                    help="warm-up calls per stack, not measured (default %(default)s)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.calls < 1 or args.concurrency < 1 or args.payload < 0 or args.warmup < 0:
        ap.error("--calls and --concurrency must be >= 1, --payload and --warmup >= 0")
    cfg = RpcBenchConfig(calls=args.calls, payload=args.payload,
                         concurrency=args.concurrency, warmup=args.warmup)
    result = asyncio.run(run(cfg))
    print(json.dumps(result.to_json()) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
