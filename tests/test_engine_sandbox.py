"""The engine with the real sandbox chain: `chainbench sandboxer` (both Sandbox API schemas)
as a child process, the engine as another, driven over CRI: lifecycle, restart recovery of
the engine, a SIGKILLed sandboxer (PENDING, then READY again once it is back), and no
leftovers.  Needs root."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from bench.engine.harness import EngineProcess
from bench.processes import find_processes, mounts_below
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.sandboxer.harness import SandboxerProcess
from bench.tracing import read_spans

pytestmark = pytest.mark.integration
T = 30


def pod_config(name: str) -> cri.PodSandboxConfig:
    ns = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="test"),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns)))


def container_config(name: str, command: list[str]) -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                               image=cri.ImageSpec(image="busybox"), command=command)


@pytest.fixture(params=["current", "legacy"])
def chain(request: Any, leak_check: Any) -> Iterator[tuple[EngineProcess, SandboxerProcess]]:
    base = Path(tempfile.mkdtemp(prefix="cbs", dir="/tmp"))
    sbx = SandboxerProcess(schema=request.param)
    eng = EngineProcess(base=base, default_runtime="sandbox", trace_dir=str(base / "trace"),
                        runtimes={"sandbox": {"controller": "sandboxer", "address": sbx.sock,
                                              "schema": request.param}})
    leak_check.watch_dir(eng.state_dir)
    leak_check.watch_dir(sbx.base)
    try:
        sbx.start()
        eng.start()
        yield eng, sbx
    finally:
        try:
            if sbx.proc is None:
                sbx.start()
            eng.teardown()
        finally:
            sbx.teardown()
            shutil.rmtree(base, ignore_errors=True)


def _code(fn: Any, req: Any, timeout: float = T) -> grpc.StatusCode:
    try:
        fn(req, timeout=timeout)
    except grpc.RpcError as exc:
        assert exc.details()
        return exc.code()
    return grpc.StatusCode.OK


def _state(s: Any, sid: str) -> int:
    return s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid),
                              timeout=T).status.state


def _await_state(s: Any, sid: str, want: int) -> None:
    deadline = time.monotonic() + T
    while _state(s, sid) != want:
        assert time.monotonic() < deadline, f"pod never reached state {want}"
        time.sleep(0.05)


def _await_container(s: Any, cid: str, want: int) -> None:
    deadline = time.monotonic() + T
    while s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid),
                            timeout=T).status.state != want:
        assert time.monotonic() < deadline, f"container never reached state {want}"
        time.sleep(0.05)


def _no_leftovers(eng: EngineProcess, sbx: SandboxerProcess) -> None:
    left = sbx.leftovers()
    me = f"{sbx.pid} " if sbx.proc is not None else "-"
    assert not left["mounts"] and not left["files"], left
    assert not [p for p in left["processes"] if not p.startswith(me)], left
    assert not find_processes(under=str(eng.state_dir))
    assert not mounts_below(eng.base)


def test_sandbox_chain_full_lifecycle(chain: tuple[EngineProcess, SandboxerProcess]) -> None:
    eng, sbx = chain
    s = eng.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("p")),
                          timeout=T).pod_sandbox_id
    st = s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True),
                            timeout=T)
    assert st.status.state == cri.SANDBOX_READY and st.status.runtime_handler == "sandbox"
    assert st.info["controller"] == "sandboxer"
    prefix = "ttrpc+unix://" if sbx.schema == "current" else "unix://"
    assert st.info["task_address"].startswith(prefix)
    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    cs = s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=T).status
    assert cs.state == cri.CONTAINER_RUNNING
    short = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("short", ["sh", "-c", "exit 3"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=short), timeout=T)
    deadline = time.monotonic() + T
    while (cs := s.ContainerStatus(cri.ContainerStatusRequest(container_id=short),
                                   timeout=T).status).state != cri.CONTAINER_EXITED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert cs.exit_code == 3
    s.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0), timeout=T)
    assert s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid),
                             timeout=T).status.state == cri.CONTAINER_EXITED
    for c in (cid, short):
        s.RemoveContainer(cri.RemoveContainerRequest(container_id=c), timeout=T)
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert _state(s, sid) == cri.SANDBOX_NOTREADY
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    _no_leftovers(eng, sbx)
    eng.stop()
    steps = {(r["call"], r["step"]) for r in read_spans(eng.trace_dir) if r["pod"] == sid}
    for step in ("cri.recv", "engine.prepare", "sandbox.create", "sandbox.start",
                 "task.connect", "engine.commit", "cri.reply"):
        assert ("RunPodSandbox", step) in steps, step
    assert ("CreateContainer", "sandbox.update") in steps
    assert ("RemovePodSandbox", "sandbox.shutdown") in steps


def test_engine_restart_recovers_sandboxer_pods(
        chain: tuple[EngineProcess, SandboxerProcess]) -> None:
    eng, sbx = chain
    s = eng.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("r")),
                          timeout=T).pod_sandbox_id
    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    eng.kill9()
    eng.start()
    s = eng.client()
    assert _state(s, sid) == cri.SANDBOX_READY
    assert s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid),
                             timeout=T).status.state == cri.CONTAINER_RUNNING
    # the tasks document survived the restart: a new container is announced next to c
    cid2 = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c2", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid2), timeout=T)
    assert s.ContainerStatus(cri.ContainerStatusRequest(container_id=cid),
                             timeout=T).status.state == cri.CONTAINER_RUNNING
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    assert not s.ListContainers(cri.ListContainersRequest(), timeout=T).containers
    _no_leftovers(eng, sbx)


def test_sigkilled_sandboxer_pending_then_ready(
        chain: tuple[EngineProcess, SandboxerProcess]) -> None:
    eng, sbx = chain
    s = eng.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("k")),
                          timeout=T).pod_sandbox_id
    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    sbx.kill9()
    _await_state(s, sid, cri.SANDBOX_NOTREADY)  # PENDING: the sandboxer is unreachable
    assert s.Version(cri.VersionRequest(), timeout=T).runtime_name  # still serving
    failing = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.DEADLINE_EXCEEDED}
    assert _code(s.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("late", ["true"])), timeout=10) in failing
    assert _code(s.StopPodSandbox, cri.StopPodSandboxRequest(pod_sandbox_id=sid),
                 timeout=10) in failing
    assert _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("new")),
                 timeout=10) in failing
    # A RunPodSandbox whose rollback could not reach the sandboxer either is kept as a
    # NotReady pod (the sandboxer may hold half of it): listed, and removable later.
    leftover = [p for p in s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
                if p.metadata.name == "new"]
    assert all(p.state == cri.SANDBOX_NOTREADY for p in leftover)
    sbx.start()  # it recovers its sandboxes; the engine's Platform probe notices
    _await_state(s, sid, cri.SANDBOX_READY)
    _await_container(s, cid, cri.CONTAINER_RUNNING)  # the engine asks again about c
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    for p in [sid] + [p.id for p in leftover]:
        s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=p), timeout=T)
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    _no_leftovers(eng, sbx)


def test_hung_sandboxer_hits_the_client_deadline(
        chain: tuple[EngineProcess, SandboxerProcess]) -> None:
    eng, sbx = chain
    s = eng.client()
    os.kill(sbx.pid, signal.SIGSTOP)
    try:
        code = _code(s.RunPodSandbox, cri.RunPodSandboxRequest(config=pod_config("hung")),
                     timeout=2)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert s.Version(cri.VersionRequest(), timeout=T).runtime_name  # still serving
    finally:
        os.kill(sbx.pid, signal.SIGCONT)
    # Once the sandboxer answers again the engine finishes its rollback: the pod is gone, or
    # (if the rollback could not reach it) listed NotReady and removable.
    deadline = time.monotonic() + T
    while any(p.state == cri.SANDBOX_READY
              for p in s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for p in s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items:
        s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=p.id), timeout=T)
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("hung")),
                          timeout=T).pod_sandbox_id  # the name was released
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    _no_leftovers(eng, sbx)


def test_engine_restart_while_sandboxer_is_down(
        chain: tuple[EngineProcess, SandboxerProcess]) -> None:
    eng, sbx = chain
    s = eng.client()
    sid = s.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("d")),
                          timeout=T).pod_sandbox_id
    cid = s.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sid, config=container_config("c", ["sleep", "600"])),
        timeout=T).container_id
    s.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=T)
    eng.stop()
    sbx.stop()  # SIGTERM: it leaves its sandboxes for the next sandboxer
    eng.start()
    s = eng.client()
    # nothing is declared dead while the sandboxer is merely away: PENDING (NotReady)
    assert _state(s, sid) == cri.SANDBOX_NOTREADY
    info = s.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True),
                              timeout=T).info
    assert info["state"] == "PENDING"
    sbx.start()
    _await_state(s, sid, cri.SANDBOX_READY)
    _await_container(s, cid, cri.CONTAINER_RUNNING)
    s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    s.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=T)
    _no_leftovers(eng, sbx)


def test_parallel_pods_through_one_sandboxer(
        chain: tuple[EngineProcess, SandboxerProcess]) -> None:
    import asyncio

    from bench.rpc.schemas import CriStub
    eng, sbx = chain

    async def go() -> list[str]:
        async with grpc.aio.insecure_channel(eng.target) as ch:
            s = CriStub(ch, "v1")

            async def one(i: int) -> str:
                sid = (await s.RunPodSandbox(cri.RunPodSandboxRequest(
                    config=pod_config(f"par{i}")), timeout=120)).pod_sandbox_id
                for j in range(2):  # two containers: two Update/Prepare per pod
                    cid = (await s.CreateContainer(cri.CreateContainerRequest(
                        pod_sandbox_id=sid, config=container_config(f"c{j}", ["sleep", "600"])),
                        timeout=120)).container_id
                    await s.StartContainer(cri.StartContainerRequest(container_id=cid),
                                           timeout=120)
                return sid
            sids = list(await asyncio.gather(*(one(i) for i in range(8))))
            running = (await s.ListContainers(cri.ListContainersRequest(
                filter=cri.ContainerFilter(state=cri.ContainerStateValue(
                    state=cri.CONTAINER_RUNNING))), timeout=T)).containers
            assert len(running) == 16
            await asyncio.gather(*(s.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=x),
                                                    timeout=120) for x in sids))
            await asyncio.gather(*(s.RemovePodSandbox(cri.RemovePodSandboxRequest(
                pod_sandbox_id=x), timeout=120) for x in sids))
            return sids
    sids = asyncio.run(go())
    assert len(set(sids)) == 8
    s = eng.client()
    assert not s.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=T).items
    _no_leftovers(eng, sbx)
