"""The engine with the real shim chain (containerd-shim-runc-v2 + runc), as a child process
driven over CRI: lifecycle, v1alpha2, bad input, restart recovery, a SIGKILLed shim, and proof
that nothing is left behind (processes, mounts, sockets, cgroups).  Needs root."""
from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from bench.engine.harness import EngineProcess
from bench.processes import find_processes, mounts_below
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.tracing import read_spans

pytestmark = pytest.mark.integration
T = 30  # client deadline of one CRI call (s)


def pod_config(name: str) -> cri.PodSandboxConfig:
    ns = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="test"),
        labels={"app": name},
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns)))


def container_config(name: str, command: list[str]) -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                               image=cri.ImageSpec(image="busybox"), command=command,
                               labels={"ctr": name})


@pytest.fixture
def engine(leak_check: Any) -> Iterator[EngineProcess]:
    base = Path(tempfile.mkdtemp(prefix="cbe", dir="/tmp"))  # short: unix socket paths
    eng = EngineProcess(base=base, runtimes={"shim": {"controller": "shim"}},
                        trace_dir=str(base / "trace"))
    leak_check.watch_dir(eng.state_dir)
    try:
        yield eng.start()
    finally:
        eng.teardown()
        shutil.rmtree(base, ignore_errors=True)
        assert_no_leftovers(eng, [])


def pod_info(stub: Any, sid: str) -> dict[str, str]:
    return dict(stub.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid,
                                                                  verbose=True),
                                      timeout=T).info)


def assert_no_leftovers(eng: EngineProcess, ids: list[str], sockets: list[str] = ()) -> None:
    procs = find_processes(cmdline_contains=["-namespace", eng.namespace])
    assert not procs, f"shims left: {[p.cmdline for p in procs]}"
    assert not find_processes(under=str(eng.state_dir))
    assert not mounts_below(eng.base)
    for s in sockets:
        assert not os.path.exists(s), f"socket {s} left"
    for i in ids:
        assert not glob.glob(f"/sys/fs/cgroup/*/chainbench/{i}"), f"cgroup of {i} left"
        assert not find_processes(cgroup_contains=i), f"process in cgroup {i} left"
    runc_root = f"{eng.state_dir}/runc/{eng.namespace}"
    assert not os.path.exists(runc_root) or not os.listdir(runc_root)
    assert not os.path.exists(f"/run/containerd/runc/{eng.namespace}")
    if eng.proc is None:  # a stopped engine also removes its empty runc root
        assert not os.path.exists(runc_root)


def socket_of(address: str) -> str:
    return address.removeprefix("ttrpc+").removeprefix("unix://")


def test_shim_chain_full_lifecycle(engine: EngineProcess) -> None:
    s = engine.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("life")),
                          timeout=T).pod_sandbox_id
    st = s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=T).status
    assert st.state == cri.SANDBOX_READY and st.runtime_handler == "shim"
    assert st.metadata.name == "life" and st.labels["app"] == "life"
    info = pod_info(s, sid)
    shim_sock = socket_of(info["task_address"])
    assert os.path.exists(shim_sock)

    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c1", ["sleep", "600"]),
        sandbox_config=pod_config("life")), timeout=T).container_id
    assert s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid),
                             timeout=T).status.state == cri.CONTAINER_CREATED
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    cs = s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid, verbose=True),
                           timeout=T)
    assert cs.status.state == cri.CONTAINER_RUNNING and cs.status.started_at > 0
    ctr_pid = int(cs.info["pid"])
    # runc keeps its state under the engine's state dir (Task.Create's runc options), not in
    # the shim's default root on the disk
    for i in (sid, cid):
        assert os.path.isfile(f"{engine.state_dir}/runc/{engine.namespace}/{i}/state.json")
        assert not os.path.exists(f"/run/containerd/runc/{engine.namespace}/{i}")
    # the container joined the pause's ipc namespace
    pause_pid = int(info["pid"])
    assert os.readlink(f"/proc/{ctr_pid}/ns/ipc") == os.readlink(f"/proc/{pause_pid}/ns/ipc")
    assert os.readlink(f"/proc/{ctr_pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc")

    pods = s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    assert [p.id for p in pods] == [sid]
    f = cri.PodSandboxFilter(label_selector={"app": "other"})
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(filter=f), timeout=T).items
    ctrs = s.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id=sid)), timeout=T).containers
    assert [(c.id, c.state) for c in ctrs] == [(cid, cri.CONTAINER_RUNNING)]

    # busybox sleep as PID 1 ignores SIGTERM: the grace period runs out, SIGKILL follows
    s.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1), timeout=T)
    cs = s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=T).status
    assert cs.state == cri.CONTAINER_EXITED and cs.exit_code == 137
    s.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=T)
    assert not s.ListContainers(cri.ListContainersRequest(), timeout=T).containers
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    st = s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=T).status
    assert st.state == cri.SANDBOX_NOTREADY
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    assert_no_leftovers(engine, [sid, cid], [shim_sock])

    engine.stop()  # spans are flushed at exit
    spans = [r for r in read_spans(engine.trace_dir) if r["pod"] == sid]
    steps = {(r["call"], r["step"]) for r in spans}
    for step in ("cri.recv", "engine.prepare", "shim.launch", "shim.spawn", "task.connect",
                 "task.create", "task.start", "engine.commit", "cri.reply"):
        assert ("RunPodSandbox", step) in steps, step
    # the shim's start in two adjacent spans: the fork on the engine's loop, then `start`
    launch = next(r for r in spans if r["step"] == "shim.launch")
    spawn = next(r for r in spans if r["step"] == "shim.spawn")
    assert launch["start_ns"] < launch["end_ns"] == spawn["start_ns"] < spawn["end_ns"]
    assert ("CreateContainer", "task.create") in steps
    assert ("RemovePodSandbox", "shim.shutdown") in steps


def test_v1alpha2_version_and_run_pod(engine: EngineProcess) -> None:
    a = engine.client("v1alpha2")
    v = a.Version(cri.VersionRequest(version="v1alpha2"), timeout=T)
    assert v.runtime_api_version == "v1alpha2" and v.runtime_name == "chainbench-engine"
    sid = a.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("alpha")),
                          timeout=T).pod_sandbox_id
    s = engine.client()
    st = s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=T).status
    assert st.state == cri.SANDBOX_READY and st.runtime_handler == "shim"
    a.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    a.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items


def _code(fn: Any, req: Any) -> grpc.StatusCode:
    try:
        fn(req, timeout=T)
    except grpc.RpcError as exc:
        assert exc.details(), "errors must carry a message"
        return exc.code()
    return grpc.StatusCode.OK


def test_bad_input_gets_clear_codes(engine: EngineProcess) -> None:
    s = engine.client()
    INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    unknown = "ab" * 32
    assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest()) == INV
    assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("../../etc"))) == INV
    assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("x" * 5000))) == INV
    assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("h"),
                                                           runtime_handler="nosuch")) == NF
    for bad in ("../../../../etc/passwd", "/abs", "a" * 100000, "ab\0cd" * 13):
        assert _code(s.PodSandboxStatus, cri.PodSandboxStatusRequest(pod_sandbox_id=bad)) == INV
        assert _code(s.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=bad)) == INV
        assert _code(s.StartContainer, cri.StartContainerRequest(container_id=bad)) == INV
    assert _code(s.PodSandboxStatus, cri.PodSandboxStatusRequest(pod_sandbox_id=unknown)) == NF
    assert _code(s.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=unknown)) == NF
    assert _code(s.ContainerStatus, cri.ContainerStatusRequest(container_id=unknown)) == NF
    assert _code(s.StopContainer, cri.StopContainerRequest(container_id=unknown)) == NF
    assert _code(s.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id=unknown, config=container_config("c", ["true"]))) == NF
    # CRI: removing what is already gone is not an error
    assert _code(s.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=unknown)) == \
        grpc.StatusCode.OK
    assert _code(s.Status, cri.StatusRequest()) == grpc.StatusCode.UNIMPLEMENTED
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("dup")),
                          timeout=T).pod_sandbox_id
    assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("dup"))) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert _code(s.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("../c", ["true"]))) == INV
    assert _code(s.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="c"), working_dir="relative"))) == INV
    # the engine still works after all that
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_engine_restart_recovers_pods(engine: EngineProcess, how: str) -> None:
    s = engine.client()
    live = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("live")),
                           timeout=T).pod_sandbox_id
    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=live, config=container_config("c", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    stopped = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("stopped")),
                              timeout=T).pod_sandbox_id
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=stopped), timeout=T)
    if how == "sigkill":
        engine.kill9()
    else:
        assert engine.stop() == 0
    engine.start()
    s = engine.client()
    pods = {p.id: p.state for p in s.ListPodSandbox(cri.ListPodSandboxRequest(),
                                                    timeout=T).items}
    assert pods == {live: cri.SANDBOX_READY, stopped: cri.SANDBOX_NOTREADY}
    ctrs = {c.id: c.state for c in s.ListContainers(cri.ListContainersRequest(),
                                                    timeout=T).containers}
    assert ctrs == {cid: cri.CONTAINER_RUNNING}
    # the recovered pod is fully usable: a new container joins it
    cid2 = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=live, config=container_config("c2", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid2), timeout=T)
    shim_sock = socket_of(pod_info(s, live)["task_address"])
    for sid in (live, stopped):
        s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
        s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert not s.ListContainers(cri.ListContainersRequest(), timeout=T).containers
    assert_no_leftovers(engine, [live, stopped, cid, cid2], [shim_sock])


def test_sigkilled_shim_fails_cleanly_and_cleans_up(engine: EngineProcess) -> None:
    s = engine.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("victim")),
                          timeout=T).pod_sandbox_id
    other = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("bystander")),
                            timeout=T).pod_sandbox_id
    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    state = json.loads((engine.state_dir / "sandboxes" / sid / "state.json").read_text())
    shim_pid = int(state["backend"]["shim_pid"])
    shim_sock = socket_of(state["backend"]["shim_address"])

    # Kill the shim while a StopContainer is in flight (the grace period is long and the
    # container ignores SIGTERM, so the call is waiting on the shim when it dies).
    result: dict[str, Any] = {}

    def stop() -> None:
        result["code"] = _code(s.StopContainer,
                               cri.StopContainerRequest(container_id=cid, timeout=25))
    t = threading.Thread(target=stop)
    t.start()
    deadline = time.monotonic() + T
    while not any(r.get("step") == "task.kill" and r.get("call") == "StopContainer"
                  for r in _live_spans(engine)) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(shim_pid, signal.SIGKILL)
    t.join(T + 5)
    assert not t.is_alive()
    assert result["code"] in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)

    # the engine keeps serving, the pod shows NotReady, the bystander is untouched
    assert s.Version(cri.VersionRequest(), timeout=T).runtime_name
    deadline = time.monotonic() + T
    while s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid),
                             timeout=T).status.state != cri.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "pod never became NotReady"
        time.sleep(0.05)
    assert s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=other),
                              timeout=T).status.state == cri.SANDBOX_READY
    code = _code(s.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("late", ["true"])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION

    # cleanup still works: the shim's delete action kills and removes what it left
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=other), timeout=T)
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    assert_no_leftovers(engine, [sid, other, cid], [shim_sock])


def _live_spans(engine: EngineProcess) -> list[dict[str, Any]]:
    # spans are flushed every trace_flush_s (1 s) by the engine
    try:
        return read_spans(engine.trace_dir)
    except FileNotFoundError:
        return []


def test_teardown_removes_every_pod_without_rpc(engine: EngineProcess) -> None:
    s = engine.client()
    ids = []
    for i in range(3):
        sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config(f"t{i}")),
                              timeout=T).pod_sandbox_id
        cid = s.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
            timeout=T).container_id
        s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
        ids += [sid, cid]
    assert engine.stop(signal.SIGINT) == 0  # a clean exit that leaves the pods running
    assert find_processes(cmdline_contains=["-namespace", engine.namespace])
    assert engine.run_teardown() == 0
    assert not list((engine.state_dir / "sandboxes").iterdir())
    assert_no_leftovers(engine, ids)


def test_crash_between_shim_start_and_commit_is_recovered(engine: EngineProcess) -> None:
    s = engine.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("crash")),
                          timeout=T).pod_sandbox_id
    shim_sock = socket_of(pod_info(s, sid)["task_address"])
    engine.kill9()
    # Rewrite the record as an engine killed right after the shim's `start` left it: the
    # shim runs, but the state file knows nothing of it.
    f = engine.state_dir / "sandboxes" / sid / "state.json"
    state = json.loads(f.read_text())
    state.update(state=0, backend={}, pid=-1, task_address="")
    f.write_text(json.dumps(state))
    engine.start()
    s = engine.client()
    assert s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid),
                              timeout=T).status.state == cri.SANDBOX_READY  # adopted
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert_no_leftovers(engine, [sid], [shim_sock])


async def _parallel_pods(target: str, n: int) -> tuple[list[str], list[grpc.StatusCode]]:
    from bench.rpc.schemas import CriStub

    async with grpc.aio.insecure_channel(target) as ch:
        s = CriStub(ch, "v1")

        async def one(i: int) -> str:
            sid = (await s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config(f"par{i}")),
                                         timeout=120)).pod_sandbox_id
            cid = (await s.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
                timeout=120)).container_id
            await s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
            return sid

        sids = list(await asyncio.gather(*(one(i) for i in range(n))))

        async def gone(sid: str) -> grpc.StatusCode:
            try:
                await s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                         timeout=120)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        # every pod removed twice at once: the per-pod lock serialises, the second is a no-op
        codes = list(await asyncio.gather(*(gone(x) for x in sids + sids)))
        return sids, codes


def test_parallel_pods_and_double_removes(engine: EngineProcess) -> None:
    sids, codes = asyncio.run(_parallel_pods(engine.target, 8))
    assert len(set(sids)) == 8
    assert codes == [grpc.StatusCode.OK] * 16
    s = engine.client()
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    assert not s.ListContainers(cri.ListContainersRequest(), timeout=T).containers
    assert_no_leftovers(engine, sids)


def test_misconfigured_runtimes_fail_cleanly(leak_check: Any) -> None:
    base = Path(tempfile.mkdtemp(prefix="cbe", dir="/tmp"))
    eng = EngineProcess(base=base, default_runtime="noshim", runtimes={
        "noshim": {"controller": "shim", "shim_binary": str(base / "no-such-shim")},
        "nosbx": {"controller": "sandboxer", "address": str(base / "no-such.sock")}})
    leak_check.watch_dir(eng.state_dir)
    try:
        s = eng.start().client()
        assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("a"))) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(
            config=pod_config("b"), runtime_handler="nosbx")) == grpc.StatusCode.UNAVAILABLE
        # neither attempt left a pod, a bundle or a record behind
        assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
        assert not list((eng.state_dir / "sandboxes").iterdir())
        assert not list((eng.state_dir / "bundles").iterdir())
    finally:
        eng.teardown()
        shutil.rmtree(base, ignore_errors=True)
