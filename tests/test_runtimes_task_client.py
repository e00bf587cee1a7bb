"""TaskClient against a stand-in Task server (our ttrpc Server): address forms, metadata,
deadlines, error codes.  The real shim is exercised in test_runtimes_shim.py."""
from __future__ import annotations

import asyncio

import pytest
from google.protobuf import empty_pb2

from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.task_client import NS_METADATA_KEY, SERVICE, TaskClient, process_spec_any
from bench.rpc.ttrpc import Code, Server, TtrpcError


def test_address_forms_metadata_deadline_and_errors(tmp_path):
    sock = str(tmp_path / "task.sock")
    seen: list[tuple[str, str | None, float | None]] = []

    async def state(req, ctx):
        seen.append((req.id, ctx.get(NS_METADATA_KEY), ctx.time_remaining()))
        if req.id == "missing":
            raise TtrpcError(Code.NOT_FOUND, "container missing: not found")
        return pb.StateResponse(id=req.id, pid=7)

    async def wait(req, ctx):
        await asyncio.sleep(10)
        return pb.WaitResponse()

    async def exec_(req, ctx):
        seen.append((req.spec.type_url, req.spec.value.decode(), None))
        return empty_pb2.Empty()

    async def main():
        server = Server()
        server.register(SERVICE, {"State": (pb.StateRequest, state),
                                  "Wait": (pb.WaitRequest, wait),
                                  "Exec": (pb.ExecProcessRequest, exec_)})
        await server.start(sock)
        try:
            for addr in (sock, f"unix://{sock}", f"ttrpc+unix://{sock}"):
                async with await TaskClient.connect(addr, namespace="ns9", timeout=3) as c:
                    r = await c.state(id="c1")
                    assert (r.id, r.pid) == ("c1", 7)
            assert [s[:2] for s in seen] == [("c1", "ns9")] * 3
            assert all(0 < s[2] <= 3 for s in seen)
            async with await TaskClient.dial(sock) as c:
                with pytest.raises(TtrpcError) as ei:
                    await c.state(id="missing")
                assert ei.value.code == Code.NOT_FOUND
                with pytest.raises(TtrpcError) as ei:
                    await c.wait(id="c1", timeout=0.1)
                assert ei.value.code == Code.DEADLINE_EXCEEDED
                with pytest.raises(TtrpcError) as ei:
                    await c.pids(id="c1")
                assert ei.value.code == Code.UNIMPLEMENTED
                await c.exec(id="c1", exec_id="e", spec=process_spec_any({"args": ["true"]}))
                assert seen[-1][0].endswith("opencontainers/runtime-spec/1/Process")
                assert seen[-1][1] == '{"args":["true"]}'
        finally:
            await server.close()
        with pytest.raises(TtrpcError) as ei:
            await TaskClient.connect(sock)
        assert ei.value.code == Code.UNAVAILABLE

    asyncio.run(main())
