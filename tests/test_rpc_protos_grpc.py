"""grpc.aio round trips through bench/rpc/schemas.py at the real wire paths."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.rpc import schemas
from bench.rpc.pb import cri_v1_pb2, sandbox_current_pb2, sandbox_legacy_pb2


class _Recorder(grpc.aio.ServerInterceptor):
    """Records the method path of every call the server receives."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.paths.append(details.method)
        return await continuation(details)


class LegacySandboxer:
    async def Start(self, req: Any, ctx: Any) -> Any:
        return sandbox_legacy_pb2.ControllerStartResponse(
            sandbox_id=req.sandbox_id, pid=42, task_address=f"unix:///run/{req.sandboxer}.sock")

    async def Prepare(self, req: Any, ctx: Any) -> Any:
        return sandbox_legacy_pb2.PrepareResponse(bundle=f"/b/{req.container_id}")


class CurrentSandboxer:
    async def Start(self, req: Any, ctx: Any) -> Any:
        return sandbox_current_pb2.ControllerStartResponse(
            sandbox_id=req.sandbox_id, pid=42,
            address=f"ttrpc+unix:///run/{req.sandboxer}.sock", version=2)

    async def Update(self, req: Any, ctx: Any) -> Any:
        assert list(req.fields) == ["extensions.tasks"]
        return sandbox_current_pb2.ControllerUpdateResponse()


class Cri:
    async def Version(self, req: Any, ctx: Any) -> Any:
        return cri_v1_pb2.VersionResponse(version="0.1.0", runtime_name="chainbench",
                                          runtime_version="0.1.0", runtime_api_version="v1")


async def _serve(sock: Path, handlers: list[grpc.GenericRpcHandler],
                 rec: _Recorder) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[rec])
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    return server


@pytest.mark.parametrize("schema", ["legacy", "current"])
def test_sandbox_round_trip(tmp_path: Path, schema: str) -> None:
    async def run() -> None:
        rec = _Recorder()
        sock = tmp_path / "sb.sock"
        servicer = LegacySandboxer() if schema == "legacy" else CurrentSandboxer()
        server = await _serve(sock, [schemas.controller_handler(servicer, schema)], rec)
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                stub = schemas.ControllerStub(ch, schema)
                req_cls, _ = schemas.SANDBOX_SCHEMAS[schema]["Start"]
                resp = await stub.Start(req_cls(sandboxer="kuasar", sandbox_id="p1"), timeout=5)
                assert resp.sandbox_id == "p1" and resp.pid == 42
                if schema == "legacy":
                    assert resp.task_address == "unix:///run/kuasar.sock"
                    r = await stub.Prepare(sandbox_legacy_pb2.PrepareRequest(container_id="c"))
                    assert r.bundle == "/b/c"
                    with pytest.raises(AttributeError, match="has no method 'Update'"):
                        stub.Update
                else:
                    assert resp.address == "ttrpc+unix:///run/kuasar.sock" and resp.version == 2
                    await stub.Update(sandbox_current_pb2.ControllerUpdateRequest(
                        sandbox_id="p1", fields=["extensions.tasks"]))
                    with pytest.raises(AttributeError, match="has no method 'Prepare'"):
                        stub.Prepare
                # a method the servicer does not implement -> UNIMPLEMENTED
                req_cls, _ = schemas.SANDBOX_SCHEMAS[schema]["Status"]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Status(req_cls(sandbox_id="p1"))
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)
        assert rec.paths[0] == "/containerd.services.sandbox.v1.Controller/Start"
        assert all(p.startswith("/containerd.services.sandbox.v1.Controller/")
                   for p in rec.paths)

    asyncio.run(run())


def test_sandbox_schema_tables() -> None:
    assert list(schemas.SANDBOX_SCHEMAS["legacy"]) == [
        "Create", "Start", "Platform", "Prepare", "Purge", "UpdateResources", "Stop", "Wait",
        "Status", "Shutdown"]
    assert set(schemas.SANDBOX_SCHEMAS["current"]) == {
        "Create", "Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics",
        "Update"}
    with pytest.raises(ValueError):
        schemas.controller_handler(object(), "gen0")
    assert schemas.sandbox_path("Start") == "/containerd.services.sandbox.v1.Controller/Start"


def test_cri_version_round_trip_v1_and_v1alpha2(tmp_path: Path) -> None:
    async def run() -> None:
        rec = _Recorder()
        sock = tmp_path / "cri.sock"
        server = await _serve(sock, schemas.cri_handlers(Cri()), rec)
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                for version in ("v1", "v1alpha2"):
                    stub = schemas.CriStub(ch, version)
                    resp = await stub.Version(cri_v1_pb2.VersionRequest(version=version),
                                              timeout=5)
                    assert resp.runtime_name == "chainbench"
                    assert resp.runtime_api_version == "v1"
        finally:
            await server.stop(None)
        assert rec.paths == ["/runtime.v1.RuntimeService/Version",
                             "/runtime.v1alpha2.RuntimeService/Version"]

    asyncio.run(run())


def test_cri_v1_only_server_rejects_v1alpha2(tmp_path: Path) -> None:
    async def run() -> None:
        sock = tmp_path / "cri1.sock"
        server = await _serve(sock, schemas.cri_handlers(Cri(), versions=("v1",)), _Recorder())
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await schemas.CriStub(ch, "v1alpha2").Version(cri_v1_pb2.VersionRequest())
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)

    asyncio.run(run())
