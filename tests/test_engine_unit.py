"""Pure-logic tests of the engine: config, id checks, the sandbox state machine, atomic
persistence and the manager's lifecycle/recovery rules, driven through a fake controller
(no processes: the real chains are covered by test_engine_shim / test_engine_sandbox)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.engine.config import ConfigError, load_config, parse_config
from bench.engine.controller import (DEADLINE, ContainerRun, Controller, ExitInfo, StartInfo,
                                     call_timeout)
from bench.engine.errors import EngineError, from_backend
from bench.engine.ids import InvalidInput, check_id, check_name, new_id
from bench.engine.manager import SandboxManager
from bench.engine.sandbox import (Container, ContainerState, Sandbox, SandboxMeta, SandboxState,
                                  StateError)
from bench.engine.store import Store, write_json_atomic
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.ttrpc import Code, TtrpcError
from bench.tracing import Tracer, read_spans


# ------------------------------------------------------------------ config
def test_config_parses_the_team_sheet_example(tmp_path: Path) -> None:
    p = tmp_path / "e.toml"
    p.write_text('listen = "/run/x/engine.sock"\nstate_dir = "/run/x/state"\n'
                 'default_runtime = "shim"\n'
                 '[runtimes.shim]\ncontroller = "shim"\nshim_binary = "containerd-shim-runc-v2"\n'
                 '[runtimes.sandbox]\ncontroller = "sandboxer"\n'
                 'address = "/run/x/sbx.sock"\nschema = "legacy"\n')
    cfg = load_config(p)
    assert cfg.listen == "/run/x/engine.sock"
    assert cfg.runtime("").name == "shim"
    assert cfg.runtime("sandbox").schema == "legacy"
    assert cfg.runtime("sandbox").sandboxer == "sandbox"


@pytest.mark.parametrize("data, msg", [
    ({"runtimes": {}}, "at least one"),
    ({"runtimes": {"a": {"controller": "vm"}}}, "controller must be"),
    ({"runtimes": {"a": {"controller": "sandboxer"}}}, "needs `address`"),
    ({"runtimes": {"a": {"controller": "sandboxer", "address": "/s", "schema": "x"}}}, "schema"),
    ({"runtimes": {"a": {"controller": "shim"}}, "default_runtime": "b"}, "default_runtime"),
    ({"runtimes": {"a": {"controller": "shim"}}, "bogus": 1}, "unknown keys"),
    ({"runtimes": {"a": {"controller": "shim"}}, "call_timeout_s": -1}, "positive"),
])
def test_config_errors_name_the_problem(data: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_config(data)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ------------------------------------------------------------------ ids
@pytest.mark.parametrize("bad", ["", "../../etc", "A" * 64, "a" * 63, "a" * 65,
                                 "0" * 63 + "/", "0" * 64 + "\n"])
def test_check_id_refuses_anything_but_64_hex(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_id(bad)


def test_new_ids_pass_their_own_check() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100 and all(check_id(i) == i for i in ids)


@pytest.mark.parametrize("bad", ["a/b", "..", "-x", "x" * 254, "a\0b", "with space"])
def test_check_name(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_name(bad, "name")
    assert check_name("pod-1.a_b", "name") == "pod-1.a_b"


# ------------------------------------------------------------------ state machine
def _meta(name: str = "p") -> SandboxMeta:
    return SandboxMeta(id=new_id(), name=name, namespace="ns", uid="u", attempt=0,
                       runtime_handler="fake", controller="fake")


def test_state_machine_follows_isulad() -> None:
    async def go() -> None:
        sb = Sandbox(_meta())
        assert sb.state == SandboxState.UNKNOWN and sb.status.pid == -1
        sb.on_started(10, 5, "unix:///x", 2)
        assert sb.ready
        assert sb.on_pending() and sb.state == SandboxState.PENDING and not sb.ready
        assert sb.on_ready() and sb.ready
        assert sb.on_exit(3) and sb.state == SandboxState.STOPPED
        assert sb.status.exit_status == 3
        # STOPPED ignores callbacks
        assert not sb.on_ready() and not sb.on_pending() and not sb.on_exit(9)
        assert sb.status.exit_status == 3
        prev = sb.begin_remove()
        assert sb.state == SandboxState.REMOVING
        with pytest.raises(StateError):
            sb.begin_remove()
        with pytest.raises(StateError):
            sb.on_started(1, 1, "", 2)
        with pytest.raises(StateError):
            sb.check_can_stop()
        assert not sb.on_exit(1)  # REMOVING ignores callbacks too
        sb.revert_remove(prev)
        assert sb.state == SandboxState.STOPPED
    asyncio.run(go())


def test_wait_state_wakes_on_change() -> None:
    async def go() -> bool:
        sb = Sandbox(_meta())
        sb.on_started(1, 1, "", 2)
        asyncio.get_running_loop().call_later(0.01, sb.on_exit, 0)
        return await sb.wait_state((SandboxState.STOPPED,), 5.0)
    assert asyncio.run(go())


# ------------------------------------------------------------------ store
def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    write_json_atomic(f, {"a": 1})
    write_json_atomic(f, {"b": 2})
    assert json.loads(f.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_store_round_trip_and_corrupt_entries_are_kept(tmp_path: Path) -> None:
    st = Store(tmp_path)
    st.init()
    sb = Sandbox(_meta())
    st.create_sandbox(sb.meta, sb.status)
    ctr = Container(id=new_id(), sandbox_id=sb.id, name="c", attempt=0)
    st.save_container(ctr)
    broken = _meta("broken")
    st.create_sandbox(broken, sb.status)
    (st.sandbox_dir(broken.id) / "metadata.json").write_text("{torn")
    (st.sandboxes / "not-an-id").mkdir()
    loaded = st.load_all()
    assert [x.meta.id for x in loaded] == [sb.id]
    assert [c.id for c in loaded[0].containers] == [ctr.id]
    assert st.sandbox_dir(broken.id).exists(), "a corrupt record must not be deleted"
    with pytest.raises(InvalidInput):
        st.sandbox_dir("../escape")


# ------------------------------------------------------------------ errors / deadlines
def test_backend_errors_map_to_grpc_codes() -> None:
    assert from_backend(TtrpcError(Code.NOT_FOUND, "x"), "d").code == grpc.StatusCode.NOT_FOUND
    assert from_backend(ConnectionRefusedError(111, "refused"), "d").code == \
        grpc.StatusCode.UNAVAILABLE
    assert from_backend(asyncio.TimeoutError(), "d").code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert from_backend(ValueError("v"), "d").code == grpc.StatusCode.INTERNAL


def test_call_timeout_is_bounded_by_the_client_deadline() -> None:
    async def go() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert call_timeout(30.0) == 30.0
        DEADLINE.set(loop.time() + 1.0)
        short = call_timeout(30.0)
        DEADLINE.set(loop.time() - 1.0)
        with pytest.raises(EngineError) as ei:
            call_timeout(30.0)
        assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        return short, 1.0
    short, limit = asyncio.run(go())
    assert 0 < short < limit


# ------------------------------------------------------------------ manager + fake controller
class FakeController(Controller):
    """Records calls; `fail` makes a named method raise; `alive` drives recovery."""

    kind = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.alive: set[str] = set()
        self.exits: dict[str, asyncio.Future[ExitInfo]] = {}
        self.ctr_exits: dict[str, asyncio.Future[ExitInfo]] = {}

    def _hit(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def _exit(self, sid: str) -> asyncio.Future[ExitInfo]:
        return self.exits.setdefault(sid, asyncio.get_running_loop().create_future())

    async def create(self, sb: Sandbox, call: str) -> None:
        self._hit("create")

    async def start(self, sb: Sandbox, call: str) -> StartInfo:
        self._hit("start")
        self.alive.add(sb.id)
        return StartInfo(pid=42, created_at=7, task_address="unix:///fake", version=2)

    async def wait(self, sb: Sandbox, cb: Any) -> None:
        cb.on_exit(await self._exit(sb.id))

    async def stop(self, sb: Sandbox, timeout_s: float, call: str) -> ExitInfo | None:
        self._hit("stop")
        self.alive.discard(sb.id)
        fut = self._exit(sb.id)
        if not fut.done():
            fut.set_result(ExitInfo(0, 9))
        return None

    async def status(self, sb: Sandbox) -> str:
        self._hit("status")
        return "SANDBOX_READY" if sb.id in self.alive else "SANDBOX_NOTREADY"

    async def shutdown(self, sb: Sandbox, call: str) -> None:
        self._hit("shutdown")

    async def build_container(self, sb: Sandbox, ctr: Container, config: Any) -> ContainerRun:
        return ContainerRun(container=ctr, spec={"process": {"args": list(config.command)}})

    async def create_container(self, sb: Sandbox, run: ContainerRun, call: str) -> int:
        self._hit("create_container")
        return 100

    async def start_container(self, sb: Sandbox, ctr: Container, call: str) -> int:
        self._hit("start_container")
        return 100

    async def kill_container(self, sb: Sandbox, ctr: Container, signal: int, call: str) -> None:
        self._hit(f"kill_container:{signal}")
        fut = self.ctr_exits.setdefault(ctr.id, asyncio.get_running_loop().create_future())
        if not fut.done():
            fut.set_result(ExitInfo(128 + signal, 11))

    async def wait_container(self, sb: Sandbox, ctr: Container) -> ExitInfo:
        fut = self.ctr_exits.setdefault(ctr.id, asyncio.get_running_loop().create_future())
        return await asyncio.shield(fut)

    async def delete_container(self, sb: Sandbox, ctr: Container, call: str) -> None:
        self._hit("delete_container")

    async def container_state(self, sb: Sandbox, ctr: Container) -> tuple[int, int, ExitInfo | None]:
        return ContainerState.RUNNING, 100, None


def _manager(tmp_path: Path, ctl: FakeController, trace: Path | None = None) -> SandboxManager:
    cfg = parse_config({"state_dir": str(tmp_path / "state"),
                        "runtimes": {"fake": {"controller": "shim"},
                                     "sbx": {"controller": "sandboxer", "address": "/x"}},
                        "stop_timeout_s": 1})
    store = Store(cfg.state_dir)
    store.init()
    return SandboxManager(cfg, store, {"fake": ctl, "sbx": ctl},
                          Tracer.from_dir(trace, "engine"))


def _pod(name: str = "p1") -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, uid="u1",
                                                                namespace="ns"))


def _ctr(name: str = "c1") -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                               image=cri.ImageSpec(image="busybox"), command=["sleep", "9"])


def test_full_lifecycle_persists_and_traces(tmp_path: Path) -> None:
    ctl = FakeController()
    trace = tmp_path / "trace"

    async def go() -> None:
        m = _manager(tmp_path, ctl, trace)
        sid = await m.run_pod(_pod(), "")
        sb = m.get_sandbox(sid[:12])  # prefixes resolve
        assert sb.ready and sb.status.pid == 42
        state = json.loads((tmp_path / "state/sandboxes" / sid / "state.json").read_text())
        assert state["state"] == SandboxState.RUNNING
        cid = await m.create_container(sid, _ctr())
        await m.start_container(cid)
        assert m.get_container(cid).state == ContainerState.RUNNING
        await m.stop_container(cid, 0)
        c = m.get_container(cid)
        assert c.state == ContainerState.EXITED and c.exit_code == 137
        await m.remove_container(cid)
        await m.remove_container(cid)  # idempotent
        await m.stop_pod(sid)
        assert sb.state == SandboxState.STOPPED
        await m.remove_pod(sid)
        await m.remove_pod(sid)  # idempotent
        assert not (tmp_path / "state/sandboxes" / sid).exists()
        m.tracer.flush()
    asyncio.run(go())
    assert ctl.calls == ["create", "start", "create_container", "start_container",
                         "kill_container:9", "delete_container", "stop", "shutdown"]
    steps = {(s["call"], s["step"]) for s in read_spans(trace)}
    assert ("RunPodSandbox", "engine.prepare") in steps
    assert ("RunPodSandbox", "engine.commit") in steps


def test_bad_input_codes(tmp_path: Path) -> None:
    ctl = FakeController()

    async def go() -> None:
        m = _manager(tmp_path, ctl)
        cases = [
            (m.run_pod(_pod("../x"), ""), grpc.StatusCode.INVALID_ARGUMENT),
            (m.run_pod(_pod("x" * 300), ""), grpc.StatusCode.INVALID_ARGUMENT),
            (m.run_pod(_pod(), "nosuch"), grpc.StatusCode.NOT_FOUND),
            (m.stop_pod("../../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT),
            (m.stop_pod("ab" * 32), grpc.StatusCode.NOT_FOUND),
            (m.create_container("ab" * 32, _ctr()), grpc.StatusCode.NOT_FOUND),
            (m.start_container("cd" * 32), grpc.StatusCode.NOT_FOUND),
        ]
        for coro, code in cases:
            with pytest.raises(EngineError) as ei:
                await coro
            assert ei.value.code == code, ei.value
        sid = await m.run_pod(_pod(), "")
        with pytest.raises(EngineError) as ei:
            await m.run_pod(_pod(), "")
        assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(EngineError) as ei:
            await m.create_container(sid, _ctr("bad/name"))
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    asyncio.run(go())
    assert ctl.calls == ["create", "start"]  # nothing bad reached the controller


def test_v1alpha2_always_takes_a_shim_runtime(tmp_path: Path) -> None:
    m = _manager(tmp_path, FakeController())
    assert m.pick_runtime("sbx", shim_only=False) == "sbx"
    assert m.pick_runtime("sbx", shim_only=True) == "fake"
    assert m.pick_runtime("", shim_only=True) == "fake"


def test_failed_start_rolls_back_everything(tmp_path: Path) -> None:
    ctl = FakeController()
    ctl.fail["start"] = TtrpcError(Code.UNAVAILABLE, "shim died")

    async def go() -> SandboxManager:
        m = _manager(tmp_path, ctl)
        with pytest.raises(EngineError) as ei:
            await m.run_pod(_pod(), "")
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shim died" in ei.value.message
        del ctl.fail["start"]
        await m.run_pod(_pod(), "")  # the name was released
        return m
    m = asyncio.run(go())
    assert ctl.calls == ["create", "start", "shutdown", "create", "start"]
    assert len(list((tmp_path / "state/sandboxes").iterdir())) == 1
    assert len(m.sandboxes) == 1


def test_failed_remove_reverts_and_can_be_retried(tmp_path: Path) -> None:
    ctl = FakeController()

    async def go() -> None:
        m = _manager(tmp_path, ctl)
        sid = await m.run_pod(_pod(), "")
        ctl.fail["shutdown"] = TtrpcError(Code.UNAVAILABLE, "sandboxer down")
        with pytest.raises(EngineError) as ei:
            await m.remove_pod(sid)
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
        assert m.get_sandbox(sid).state == SandboxState.STOPPED
        del ctl.fail["shutdown"]
        await m.remove_pod(sid)
        assert sid not in m.sandboxes
    asyncio.run(go())


def test_recovery_keeps_live_pods_and_reports_dead_ones(tmp_path: Path) -> None:
    ctl = FakeController()

    async def first() -> tuple[str, str, str]:
        m = _manager(tmp_path, ctl)
        live = await m.run_pod(_pod("live"), "")
        dead = await m.run_pod(_pod("dead"), "")
        cid = await m.create_container(live, _ctr())
        await m.start_container(cid)
        await m.close()  # engine exit: background waits stop, nothing is stopped
        return live, dead, cid
    live, dead, cid = asyncio.run(first())
    ctl.alive.discard(dead)  # the dead pod's backend vanished while no engine ran
    ctl.exits.clear()
    ctl.ctr_exits.clear()

    async def second() -> None:
        m = _manager(tmp_path, ctl)
        await m.recover()
        assert m.get_sandbox(live).ready
        assert m.get_sandbox(dead).state == SandboxState.STOPPED
        assert m.get_container(cid).state == ContainerState.RUNNING
        with pytest.raises(EngineError):  # names stay reserved across restarts
            await m.run_pod(_pod("live"), "")
        assert await m.remove_all() == []
        assert not m.sandboxes and not m.containers
        await m.close()
    asyncio.run(second())
    assert not list((tmp_path / "state/sandboxes").iterdir())
