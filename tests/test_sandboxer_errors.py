"""Sandboxer bad input: ids from the wire, unknown sandboxes, duplicates, wrong-schema calls,
bad task documents (real sandboxer process, root) — and the pure logic behind them."""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from bench.rpc.pb import containerd_types_pb2 as ct
from bench.rpc.pb import sandbox_current_pb2 as cur
from bench.rpc.pb import sandbox_legacy_pb2 as leg
from bench.rpc.schemas import SANDBOX_SERVICE, ControllerStub
from bench.rpc.task_client import TaskClient
from bench.rpc.ttrpc import Code, TtrpcError
from bench.runtimes import assets, oci
from bench.sandboxer import bundle, nspin
from bench.sandboxer.harness import SandboxerProcess
from bench.sandboxer.state import BadId, Container, Sandbox, check_id

BAD_IDS = ["", "../x", "a/b", ".hidden", "..", "x" * 200, "sp ace", "nul\0x", "é"]


@pytest.fixture
def sandboxer(leak_check):
    made = []

    def make(schema: str) -> SandboxerProcess:
        s = SandboxerProcess(schema)
        leak_check.watch_dir(s.base)
        leak_check.watch_socket(s.sock)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.teardown()


async def code_of(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await coro
    return ei.value.code()


def test_current_schema_errors(sandboxer, leak_check):
    s = sandboxer("current")
    sid = f"sb-{uuid.uuid4().hex[:8]}"
    leak_check.watch_cgroup(f"chainbench-test-{sid}")

    async def go() -> None:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "current")
            for bad in BAD_IDS:
                assert await code_of(st.Create(cur.ControllerCreateRequest(sandbox_id=bad))) \
                    == grpc.StatusCode.INVALID_ARGUMENT, bad
                assert await code_of(st.Status(cur.ControllerStatusRequest(sandbox_id=bad))) \
                    == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert not any(s.dir.iterdir())
            assert await code_of(st.Status(cur.ControllerStatusRequest(sandbox_id="nope"))) \
                == grpc.StatusCode.NOT_FOUND
            assert await code_of(st.Start(cur.ControllerStartRequest(sandbox_id="nope"))) \
                == grpc.StatusCode.NOT_FOUND
            assert await code_of(st.Wait(cur.ControllerWaitRequest(sandbox_id="nope"))) \
                == grpc.StatusCode.NOT_FOUND
            assert await code_of(st.Update(cur.ControllerUpdateRequest(sandbox_id="nope"))) \
                == grpc.StatusCode.NOT_FOUND
            assert await code_of(st.Create(cur.ControllerCreateRequest(
                sandbox_id="x", netns_path="relative/ns"))) == grpc.StatusCode.INVALID_ARGUMENT

            await st.Create(cur.ControllerCreateRequest(sandbox_id=sid))
            assert await code_of(st.Create(cur.ControllerCreateRequest(sandbox_id=sid))) \
                == grpc.StatusCode.ALREADY_EXISTS
            # options that are not a PodSandboxConfig are ignored (Kuasar logs them)
            await st.Create(cur.ControllerCreateRequest(
                sandbox_id=sid + "x", options=any_pb2.Any(value=b"\xff\xfe garbage")))
            r = await st.Start(cur.ControllerStartRequest(sandbox_id=sid))

            def update(doc: object, fields=("extensions.tasks",), raw: bytes | None = None):
                sb = ct.Sandbox(sandbox_id=sid)
                if doc is not None or raw is not None:
                    sb.extensions["tasks"].value = raw if raw is not None else \
                        json.dumps(doc).encode()
                return st.Update(cur.ControllerUpdateRequest(sandbox_id=sid, sandbox=sb,
                                                             fields=list(fields)))

            await update(None, fields=["labels"])  # other fields: accepted, nothing to do
            for doc, raw in [(None, None), (None, b"{not json"), ([1, 2], None),
                             ({"tasks": [{"task_id": "../../etc"}]}, None),
                             ({"tasks": [{"task_id": "ok", "spec": "nope"}]}, None),
                             ({"tasks": [{"task_id": "ok", "spec": {"process": {}},
                                          "rootfs": ["x"]}]}, None)]:
                assert await code_of(update(doc, raw=raw)) == \
                    grpc.StatusCode.INVALID_ARGUMENT, (doc, raw)

            # legacy-only methods do not exist on a current socket
            legacy_stub = ControllerStub(ch, "legacy")
            assert await code_of(legacy_stub.Prepare(leg.PrepareRequest(sandbox_id=sid))) \
                == grpc.StatusCode.UNIMPLEMENTED

            # a container whose binary does not exist: runc create fails, nothing is left
            spec = oci.container_spec(str(assets.ensure_rootfs()), "broken", ["/no/such/bin"],
                                      cgroups_path=f"/chainbench-test-{sid}")
            await update({"tasks": [{"task_id": "broken", "spec": spec}]})
            async with await TaskClient.dial(r.address) as tc:
                with pytest.raises(TtrpcError) as ei:
                    await tc.create(id="broken", bundle="")
                assert ei.value.code == Code.INTERNAL and "/no/such/bin" in ei.value.message
                runc_root = s.dir / sid / "runc"
                assert not runc_root.exists() or list(runc_root.iterdir()) == []
                with pytest.raises(TtrpcError) as ei:
                    await tc.state(id="broken")
                assert ei.value.code == Code.NOT_FOUND  # still only announced
            await update({"tasks": []})
            assert not (s.dir / sid / "c" / "broken").exists()

            async with await TaskClient.dial(r.address) as tc:
                for bad in ("../../etc", "a/b", ""):
                    with pytest.raises(TtrpcError) as ei:
                        await tc.create(id=bad, bundle="/tmp")
                    assert ei.value.code == Code.INVALID_ARGUMENT, bad
                with pytest.raises(TtrpcError) as ei:
                    await tc.create(id="c1", bundle="relative")
                assert ei.value.code == Code.INVALID_ARGUMENT
                with pytest.raises(TtrpcError) as ei:
                    await tc.create(id="c1", bundle="/nonexistent-bundle")
                assert ei.value.code == Code.INVALID_ARGUMENT
                for call in (tc.state(id="ghost"), tc.kill(id="ghost"), tc.wait(id="ghost"),
                             tc.delete(id="ghost"), tc.start(id="ghost")):
                    with pytest.raises(TtrpcError) as ei:
                        await call
                    assert ei.value.code == Code.NOT_FOUND
                with pytest.raises(TtrpcError) as ei:
                    await tc.exec(id="ghost", exec_id="e1")
                assert ei.value.code == Code.NOT_FOUND
                with pytest.raises(TtrpcError) as ei:
                    await tc.stats(id="ghost")
                assert ei.value.code == Code.UNIMPLEMENTED
            await st.Stop(cur.ControllerStopRequest(sandbox_id=sid))
            assert await code_of(st.Start(cur.ControllerStartRequest(sandbox_id=sid))) \
                == grpc.StatusCode.FAILED_PRECONDITION
            await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid))
            await st.Shutdown(cur.ControllerShutdownRequest(sandbox_id=sid + "x"))

    asyncio.run(go())
    assert s.stop() == 0
    assert s.leftovers() == {"mounts": [], "files": [], "processes": []}


def test_legacy_schema_errors(sandboxer):
    s = sandboxer("legacy")

    async def go() -> None:
        async with grpc.aio.insecure_channel(s.target) as ch:
            st = ControllerStub(ch, "legacy")
            for bad in BAD_IDS[:4]:
                assert await code_of(st.Create(leg.ControllerCreateRequest(sandbox_id=bad))) \
                    == grpc.StatusCode.INVALID_ARGUMENT
            sid = f"sb-{uuid.uuid4().hex[:8]}"
            await st.Create(leg.ControllerCreateRequest(sandbox_id=sid))
            await st.Start(leg.ControllerStartRequest(sandbox_id=sid))
            assert await code_of(st.Prepare(leg.PrepareRequest(
                sandbox_id=sid, container_id="c", spec=any_pb2.Any(value=b"{bad")))) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await code_of(st.Prepare(leg.PrepareRequest(
                sandbox_id=sid, container_id="../c", spec=any_pb2.Any(value=b"{}")))) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await code_of(st.Prepare(leg.PrepareRequest(
                sandbox_id="ghost", container_id="c"))) == grpc.StatusCode.NOT_FOUND
            assert await code_of(st.UpdateResources(leg.UpdateResourcesRequest(
                sandbox_id=sid, container_id="ghost"))) == grpc.StatusCode.NOT_FOUND
            # current-only methods do not exist on a legacy socket
            raw = ch.unary_unary(f"/{SANDBOX_SERVICE}/Update",
                                 request_serializer=cur.ControllerUpdateRequest.SerializeToString,
                                 response_deserializer=cur.ControllerUpdateResponse.FromString)
            assert await code_of(raw(cur.ControllerUpdateRequest(sandbox_id=sid))) \
                == grpc.StatusCode.UNIMPLEMENTED
            await st.Shutdown(leg.ControllerShutdownRequest(sandbox_id=sid))

    asyncio.run(go())
    assert s.stop() == 0
    assert s.leftovers() == {"mounts": [], "files": [], "processes": []}


# ---------------------------------------------------------------- pure logic (no root needed)

def test_check_id():
    for good in ("a", "0" * 64, "pod-1_x.y", "A" * 128):
        assert check_id(good) == good
    for bad in BAD_IDS + ["A" * 129, "-lead"]:
        with pytest.raises(BadId):
            check_id(bad)


def test_namespace_plan():
    POD, NODE = 0, 2
    assert nspin.plan(None, None, "") == ("ipc", "uts")
    assert nspin.plan(POD, NODE, "") == ("ipc",)
    assert nspin.plan(NODE, NODE, "") == ()
    assert nspin.plan(POD, POD, "") == ("ipc", "uts", "network")
    assert nspin.plan(POD, POD, "/var/run/netns/x") == ("ipc", "uts")


def test_rewrite_spec_points_at_pins(tmp_path: Path):
    sb = Sandbox(id="sb", dir=str(tmp_path / "sb"), pinned=["ipc", "uts"],
                 netns_path="/run/netns/n")
    spec = {"process": {"args": ["x"]}, "hostname": "h", "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "ipc"}, {"type": "network"},
                                     {"type": "pid"}, {"type": "cgroup"}]}}
    out = bundle.rewrite_spec(spec, sb, "c1", "/engine/bundle")
    nss = out["linux"]["namespaces"]
    assert {"type": "ipc", "path": str(tmp_path / "sb" / "ns" / "ipc")} in nss
    assert {"type": "uts", "path": str(tmp_path / "sb" / "ns" / "uts")} in nss
    assert {"type": "network", "path": "/run/netns/n"} in nss
    assert {"type": "mount"} in nss and {"type": "pid"} in nss and {"type": "cgroup"} in nss
    assert len(nss) == 6
    assert "hostname" not in out
    assert out["root"]["path"] == "/engine/bundle/rootfs"
    assert out["linux"]["cgroupsPath"] == "/chainbench-sb-c1"
    with pytest.raises(bundle.SpecError):
        bundle.rewrite_spec({"root": {}}, sb, "c1", None)


def test_state_round_trip(tmp_path: Path):
    (tmp_path / "sb").mkdir()
    sb = Sandbox(id="sb", dir=str(tmp_path / "sb"), state="ready", pinned=["ipc"], pod="p")
    sb.containers["c"] = Container(id="c", bundle="/b", status="running", pid=42, prepared=True,
                                   execs={"e": {"spec": {}}})
    sb.save()
    from bench.sandboxer.state import load_all
    [back] = load_all(tmp_path)
    assert back.to_json() == sb.to_json()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sandbox.json").write_text('{"id": "../evil", "dir": "/"}')
    assert [b.id for b in load_all(tmp_path)] == ["sb"]


def test_vm_pool_flags_parse_and_reject_bad_values(capsys):
    from bench.sandboxer.server import parse_args
    base = ["--listen", "/tmp/x.sock", "--dir", "/tmp/x", "--schema", "current"]
    opts = parse_args(base + ["--backend", "vm", "--vm-pool", "3", "--vm-pool-mode", "restored"])
    assert (opts.vm_pool, opts.vm_pool_mode) == (3, "restored")
    assert parse_args(base).vm_pool is None  # the env (CHAINBENCH_VM_POOL) decides
    for bad in (["--vm-pool", "-1"], ["--vm-pool", "65"], ["--vm-pool-mode", "warm"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(base + bad)
        assert exc.value.code == 2
    assert "--vm-pool" in capsys.readouterr().err
