"""Owns: pytest-benchmark cases for the RPC hot path (ttrpc vs grpc.aio) and a rpcbench smoke test.

pyproject passes --benchmark-disable, so in CI each benchmark body runs once as a plain test;
run `pytest tests/test_bench_rpc.py --benchmark-enable` to get timings.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from bench import rpcbench

MSG = BytesValue(value=b"x" * 64)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """One event loop with both servers and clients, driven synchronously by the benchmarks."""
    tmp = tmp_path_factory.mktemp("rpc")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio looks the loop up when objects are created
    t_server, t_client = loop.run_until_complete(rpcbench._start_ttrpc(str(tmp / "t.sock")))
    g_server, g_channel, g_stub = loop.run_until_complete(rpcbench._start_grpc(str(tmp / "g.sock")))
    yield loop, t_client, g_stub
    loop.run_until_complete(t_client.close())
    loop.run_until_complete(t_server.close())
    loop.run_until_complete(g_channel.close())
    loop.run_until_complete(g_server.stop(None))
    loop.close()
    asyncio.set_event_loop(None)


def test_bench_ttrpc_unary_rtt(benchmark, stacks):
    loop, client, _ = stacks

    async def call():  # same wrapping as the grpc case, so both pay the same overhead
        return await client.call(rpcbench.SERVICE, rpcbench.METHOD, MSG, BytesValue)

    def once():
        return loop.run_until_complete(call())

    assert benchmark(once) == MSG


def test_bench_grpc_unary_rtt(benchmark, stacks):
    loop, _, stub = stacks

    async def call():
        return await stub(MSG)  # create the grpc call object inside the running loop

    def once():
        return loop.run_until_complete(call())

    assert benchmark(once) == MSG


def test_rpcbench_json_shape(capsys):
    assert rpcbench.main(["--json", "--calls", "40", "--warmup", "5",
                          "--concurrency", "4", "--payload", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ttrpc_rtt_us", "grpc_rtt_us"):
        assert set(out[key]) >= {"p50", "p95"} and out[key]["p50"] > 0
    assert out["samples"] == 40
    assert out["ttrpc_calls_per_s"] > 0 and out["grpc_calls_per_s"] > 0
    assert out["ratio_p50"] == pytest.approx(out["ttrpc_rtt_us"]["p50"] / out["grpc_rtt_us"]["p50"],
                                             rel=0.01)


def test_rpcbench_table(capsys):
    assert rpcbench.main(["--calls", "10", "--warmup", "0", "--concurrency", "2"]) == 0
    assert "ratio p50 ttrpc/grpc" in capsys.readouterr().out
