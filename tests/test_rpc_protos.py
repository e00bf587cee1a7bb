"""Generated-code drift and wire facts of our own .proto files (shared/wire-contracts.md)."""
from __future__ import annotations

import struct

import pytest

from bench.rpc import protogen
from bench.rpc.pb import (containerd_task_types_pb2, containerd_types_pb2, cri_v1_pb2,
                          events_pb2, runc_options_pb2, sandbox_current_pb2,
                          sandbox_legacy_pb2, task_events_pb2, task_v2_pb2, ttrpc_pb2)


def test_generated_code_matches_protos() -> None:
    stale = protogen.drift()
    assert not stale, (f"generated protobuf code is out of date: {stale}; "
                       "run `chainbench protogen` and commit the result")


def test_every_proto_has_generated_module() -> None:
    for proto in protogen.proto_files():
        assert (proto.parent / f"{proto.stem}_pb2.py").exists(), proto


def _fields(msg: type) -> dict[str, int]:
    return {f.name: f.number for f in msg.DESCRIPTOR.fields}


def test_packages() -> None:
    assert containerd_types_pb2.DESCRIPTOR.package == "containerd.types"
    assert containerd_task_types_pb2.DESCRIPTOR.package == "containerd.v1.types"
    assert task_v2_pb2.DESCRIPTOR.package == "containerd.task.v2"
    assert runc_options_pb2.Options.DESCRIPTOR.full_name == "containerd.runc.v1.Options"
    assert events_pb2.DESCRIPTOR.services_by_name["Events"].full_name == \
        "containerd.services.events.ttrpc.v1.Events"
    assert task_events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert sandbox_current_pb2.DESCRIPTOR.services_by_name["Controller"].full_name == \
        "containerd.services.sandbox.v1.Controller"
    assert cri_v1_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name == \
        "runtime.v1.RuntimeService"


def test_task_service_has_all_17_methods() -> None:
    svc = task_v2_pb2.DESCRIPTOR.services_by_name["Task"]
    assert [m.name for m in svc.methods] == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
        "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown"]
    assert svc.methods_by_name["Exec"].output_type.full_name == "google.protobuf.Empty"
    assert "ExecProcessResponse" in task_v2_pb2.DESCRIPTOR.message_types_by_name
    assert _fields(task_v2_pb2.StateResponse)["exec_id"] == 11
    assert _fields(task_v2_pb2.CreateTaskRequest)["options"] == 10


def test_ttrpc_worked_example_connect_request() -> None:
    # wire-contracts §5: unary Connect with ConnectRequest{id:"c1"} on stream 1.
    payload = ttrpc_pb2.Request(
        service="containerd.task.v2.Task", method="Connect",
        payload=task_v2_pb2.ConnectRequest(id="c1").SerializeToString()).SerializeToString()
    frame = struct.pack(">IIBB", len(payload), 1, 0x01, 0x00) + payload
    assert frame == (bytes.fromhex("00000028 00000001 01 00")
                     + b"\x0a\x17containerd.task.v2.Task" + b"\x12\x07Connect"
                     + b"\x1a\x04\x0a\x02c1")
    assert len(payload) == 40


def test_sandbox_field_numbers_legacy_vs_current() -> None:
    lg, cur = sandbox_legacy_pb2, sandbox_current_pb2
    assert _fields(lg.ControllerCreateRequest) == {
        "sandboxer": 1, "sandbox_id": 2, "rootfs": 3, "options": 4, "netns_path": 5}
    assert _fields(cur.ControllerCreateRequest) == {
        "sandbox_id": 1, "rootfs": 2, "options": 3, "netns_path": 4, "annotations": 5,
        "sandbox": 6, "sandboxer": 10}
    assert _fields(lg.ControllerStartResponse)["task_address"] == 5
    assert _fields(cur.ControllerStartResponse)["address"] == 5
    assert _fields(cur.ControllerStartResponse)["version"] == 6
    assert _fields(lg.ControllerStatusResponse)["task_address"] == 4
    assert _fields(cur.ControllerStatusResponse)["address"] == 8
    assert _fields(cur.ControllerStatusResponse)["version"] == 9
    assert _fields(cur.ControllerUpdateRequest)["sandboxer"] == 2
    for name in ("Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics"):
        assert _fields(getattr(cur, f"Controller{name}Request"))["sandboxer"] == 10, name
    for name in ("ControllerStartRequest", "ControllerStopRequest", "PrepareRequest",
                 "PurgeRequest", "UpdateResourcesRequest", "ControllerShutdownRequest"):
        assert _fields(getattr(lg, name))["sandboxer"] == 1, name
        assert _fields(getattr(lg, name))["sandbox_id"] == 2, name
    # types.Sandbox: current sandboxer=10 / labels=4; legacy sandboxer=4 / labels=5.
    assert _fields(containerd_types_pb2.Sandbox)["sandboxer"] == 10
    assert _fields(containerd_types_pb2.Sandbox)["extensions"] == 7
    assert _fields(lg.Sandbox)["sandboxer"] == 4
    assert _fields(lg.Sandbox)["extensions"] == 8


def test_sandbox_field_numbers_on_the_wire() -> None:
    lg, cur = sandbox_legacy_pb2, sandbox_current_pb2
    # legacy Create: 0a=field 1 (sandboxer), 12=field 2 (sandbox_id)
    assert lg.ControllerCreateRequest(sandboxer="k", sandbox_id="p").SerializeToString() == \
        b"\x0a\x01k\x12\x01p"
    # current Start: sandbox_id=1 (0a), sandboxer=10 (0x52)
    assert cur.ControllerStartRequest(sandbox_id="p", sandboxer="k").SerializeToString() == \
        b"\x0a\x01p\x52\x01k"
    # current Update: sandboxer=2 (12)
    assert cur.ControllerUpdateRequest(sandbox_id="p", sandboxer="k").SerializeToString() == \
        b"\x0a\x01p\x12\x01k"
    # Start response: address/task_address=5 (2a), version=6 (30)
    assert lg.ControllerStartResponse(task_address="a").SerializeToString() == b"\x2a\x01a"
    assert cur.ControllerStartResponse(address="a", version=2).SerializeToString() == \
        b"\x2a\x01a\x30\x02"
    # Status: current address=8 (42), legacy task_address=4 (22)
    assert cur.ControllerStatusResponse(address="a").SerializeToString() == b"\x42\x01a"
    assert lg.ControllerStatusResponse(task_address="a").SerializeToString() == b"\x22\x01a"
    # The generations are not wire compatible: a legacy Status answer breaks a current
    # client (field 4 string vs map entry) — wire-contracts §1.8.
    legacy_bytes = lg.ControllerStatusResponse(task_address="unix:///x").SerializeToString()
    with pytest.raises(Exception):
        cur.ControllerStatusResponse.FromString(legacy_bytes)


def test_platform_and_cri_numbers() -> None:
    assert _fields(containerd_types_pb2.Platform) == {
        "os": 1, "architecture": 2, "variant": 3, "os_version": 4, "os_features": 5}
    assert _fields(cri_v1_pb2.LinuxSandboxSecurityContext)["supplemental_groups_policy"] == 11
    assert _fields(cri_v1_pb2.ContainerConfig)["stop_signal"] == 18
    assert _fields(cri_v1_pb2.ImageSpec)["runtime_handler"] == 19
    assert cri_v1_pb2.Signal.Value("SIGNAL_SIGRTMINPLUS15") == 50
    assert cri_v1_pb2.Signal.Value("SIGNAL_SIGRTMAXMINUS14") == 51
    assert cri_v1_pb2.Signal.Value("SIGNAL_SIGRTMAX") == 65
