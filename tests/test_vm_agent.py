"""The guest agent's Task API, run on the host over a socketpair (real processes, no VM)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from bench.rpc.pb import containerd_task_types_pb2 as tt
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client, Code, TtrpcError
from bench.vm.agent import PAUSE_ARGS, SERVICE, ProcSpec, spec_for_create

REPO = Path(__file__).resolve().parents[1]
PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def proc_any(args: list[str], **extra: object) -> any_pb2.Any:
    return any_pb2.Any(type_url=PROCESS_URL, value=json.dumps({"args": args, **extra}).encode())


class Agent:
    """The agent as a child process serving one end of a socketpair."""

    def __init__(self) -> None:
        a, b = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.vm.agent", "--fd",
                                      str(b.fileno())], pass_fds=[b.fileno()], cwd=REPO)
        b.close()
        self.sock = a
        self.client: Client | None = None

    async def __aenter__(self) -> "Agent":
        self.client = await Client.from_socket(self.sock, label="agent")
        return self

    async def call(self, method: str, req: object, resp_cls: type, timeout: float = 20.0):
        assert self.client is not None
        return await self.client.call(SERVICE, method, req, resp_cls, timeout=timeout)

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_lifecycle_of_true_and_exit_codes() -> None:
    async def main() -> None:
        async with Agent() as ag:
            conn = await ag.call("Connect", pb.ConnectRequest(), pb.ConnectResponse)
            assert conn.version.startswith("chainbench-agent")
            assert conn.shim_pid == ag.proc.pid
            r = await ag.call("Create", pb.CreateTaskRequest(id="t1", options=proc_any(["true"])),
                              pb.CreateTaskResponse)
            assert r.pid == 0
            st = await ag.call("State", pb.StateRequest(id="t1"), pb.StateResponse)
            assert st.status == tt.CREATED
            started = await ag.call("Start", pb.StartRequest(id="t1"), pb.StartResponse)
            assert started.pid > 0
            w = await ag.call("Wait", pb.WaitRequest(id="t1"), pb.WaitResponse)
            assert w.exit_status == 0 and w.exited_at.seconds > 0
            st = await ag.call("State", pb.StateRequest(id="t1"), pb.StateResponse)
            assert st.status == tt.STOPPED and st.pid == started.pid
            d = await ag.call("Delete", pb.DeleteRequest(id="t1"), pb.DeleteResponse)
            assert d.pid == started.pid and d.exit_status == 0
            with pytest.raises(TtrpcError) as e:
                await ag.call("Delete", pb.DeleteRequest(id="t1"), pb.DeleteResponse)
            assert e.value.code == Code.NOT_FOUND

            await ag.call("Create", pb.CreateTaskRequest(
                id="t2", options=proc_any(["sh", "-c", "exit 3"])), pb.CreateTaskResponse)
            await ag.call("Start", pb.StartRequest(id="t2"), pb.StartResponse)
            w = await ag.call("Wait", pb.WaitRequest(id="t2"), pb.WaitResponse)
            assert w.exit_status == 3
            await ag.call("Delete", pb.DeleteRequest(id="t2"), pb.DeleteResponse)
    asyncio.run(main())


def test_pause_exec_kill_and_preconditions() -> None:
    async def main() -> None:
        async with Agent() as ag:
            await ag.call("Create", pb.CreateTaskRequest(id="pod"), pb.CreateTaskResponse)
            pause = await ag.call("Start", pb.StartRequest(id="pod"), pb.StartResponse)
            with pytest.raises(TtrpcError) as e:
                await ag.call("Create", pb.CreateTaskRequest(id="pod"), pb.CreateTaskResponse)
            assert e.value.code == Code.ALREADY_EXISTS
            await ag.call("Exec", pb.ExecProcessRequest(id="pod", exec_id="e1",
                                                        spec=proc_any(["sleep", "60"])),
                          empty_pb2.Empty)
            ex = await ag.call("Start", pb.StartRequest(id="pod", exec_id="e1"),
                               pb.StartResponse)
            pids = await ag.call("Pids", pb.PidsRequest(id="pod"), pb.PidsResponse)
            assert {p.pid for p in pids.processes} == {pause.pid, ex.pid}
            with pytest.raises(TtrpcError) as e:
                await ag.call("Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse)
            assert e.value.code == Code.FAILED_PRECONDITION
            await ag.call("Kill", pb.KillRequest(id="pod", signal=9, all=True), empty_pb2.Empty)
            w = await ag.call("Wait", pb.WaitRequest(id="pod"), pb.WaitResponse)
            assert w.exit_status == 137
            w = await ag.call("Wait", pb.WaitRequest(id="pod", exec_id="e1"), pb.WaitResponse)
            assert w.exit_status == 137
            with pytest.raises(TtrpcError) as e:
                await ag.call("Kill", pb.KillRequest(id="pod", signal=15), empty_pb2.Empty)
            assert e.value.code == Code.NOT_FOUND
            await ag.call("Delete", pb.DeleteRequest(id="pod", exec_id="e1"), pb.DeleteResponse)
            await ag.call("Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse)
            for pid in (pause.pid, ex.pid):
                assert not os.path.exists(f"/proc/{pid}") or \
                    Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    asyncio.run(main())


def test_bad_input_gets_status_codes() -> None:
    async def main() -> None:
        async with Agent() as ag:
            cases = [
                ("Create", pb.CreateTaskRequest(id="../x"), pb.CreateTaskResponse,
                 Code.INVALID_ARGUMENT),
                ("Create", pb.CreateTaskRequest(id="x", options=any_pb2.Any(
                    type_url="example.com/Other", value=b"")), pb.CreateTaskResponse,
                 Code.INVALID_ARGUMENT),
                ("Create", pb.CreateTaskRequest(id="x", options=any_pb2.Any(
                    type_url=PROCESS_URL, value=b"{not json")), pb.CreateTaskResponse,
                 Code.INVALID_ARGUMENT),
                ("Start", pb.StartRequest(id="nope"), pb.StartResponse, Code.NOT_FOUND),
                ("Wait", pb.WaitRequest(id="nope"), pb.WaitResponse, Code.NOT_FOUND),
                ("Stats", pb.StatsRequest(id="x"), pb.StatsResponse, Code.UNIMPLEMENTED),
            ]
            for method, req, resp, code in cases:
                with pytest.raises(TtrpcError) as e:
                    await ag.call(method, req, resp)
                assert e.value.code == code, (method, e.value)
            await ag.call("Create", pb.CreateTaskRequest(
                id="missing", options=proc_any(["/no/such/binary"])), pb.CreateTaskResponse)
            with pytest.raises(TtrpcError) as e:
                await ag.call("Start", pb.StartRequest(id="missing"), pb.StartResponse)
            assert e.value.code == Code.FAILED_PRECONDITION
            # the agent is still healthy after all that
            assert (await ag.call("Connect", pb.ConnectRequest(), pb.ConnectResponse)).shim_pid
    asyncio.run(main())


def test_spec_sources(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"process": {"args": ["echo", "hi"], "env": ["A=1"], "cwd": "/tmp"}}))
    assert spec_for_create(pb.CreateTaskRequest(id="a", bundle=str(bundle))) == \
        ProcSpec(["echo", "hi"], ["A=1"], "/tmp")
    # A host bundle path that does not exist in the guest means: the pod's pause process.
    assert spec_for_create(pb.CreateTaskRequest(id="a", bundle="/no/such")).args == PAUSE_ARGS
    spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                       value=json.dumps({"process": {"args": ["id"]}}).encode())
    assert spec_for_create(pb.CreateTaskRequest(id="a", options=spec)).args == ["id"]
    runc_opts = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"")
    assert spec_for_create(pb.CreateTaskRequest(id="a", options=runc_opts)).args == PAUSE_ARGS
    with pytest.raises(TtrpcError):
        ProcSpec.from_oci_process({"args": []})
