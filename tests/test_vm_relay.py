"""The shim-side relay to a guest agent when the agent is silent or unreachable: a clear status
naming the VM, never a hang (a real ttrpc server stands in for the agent; no VM needed)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import CallContext, Client, Code, Server, TtrpcError
from bench.vm.qemu import TASK_SERVICE
from bench.vm.relay import AgentRelay


class SilentAgentVM:
    """What AgentRelay needs of a MicroVM: an id, a serial log path and dial()."""

    def __init__(self, sock: str | None) -> None:
        self.id = "vm-silent"
        self.serial_log = "/run/x/serial.log"
        self.sock = sock

    async def dial(self) -> Client:
        if self.sock is None:
            raise TtrpcError(Code.UNAVAILABLE, "cannot connect to ttrpc /nowhere: timeout")
        return await Client.connect(self.sock)


def ctx(method: str) -> CallContext:
    return CallContext(TASK_SERVICE, method, 1, {}, None)


def test_silent_agent_gets_a_deadline_and_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def hang(req: object, c: CallContext) -> pb.StateResponse:
            await never.wait()
            return pb.StateResponse()

        server = Server()
        server.register(TASK_SERVICE, {"State": (pb.StateRequest, hang),
                                       "Wait": (pb.WaitRequest, hang)})
        sock = str(tmp_path / "agent.sock")
        await server.start(sock)
        relay = AgentRelay(SilentAgentVM(sock), default_timeout=0.2)  # type: ignore[arg-type]
        try:
            with pytest.raises(TtrpcError) as err:
                await relay.forward("State", pb.StateRequest(id="c").SerializeToString(),
                                    ctx("State"))
            assert err.value.code == Code.DEADLINE_EXCEEDED
            assert "vm-silent did not answer State" in str(err.value)
            assert "serial.log" in str(err.value)
            # Wait blocks by design: no default deadline is imposed on it.
            wait = asyncio.ensure_future(relay.forward(
                "Wait", pb.WaitRequest(id="c").SerializeToString(), ctx("Wait")))
            await asyncio.sleep(0.5)
            assert not wait.done()
            wait.cancel()
        finally:
            await relay.close()
            await server.close()
    asyncio.run(main())


def test_unreachable_agent_is_unavailable_with_the_vm_named() -> None:
    async def main() -> None:
        relay = AgentRelay(SilentAgentVM(None))  # type: ignore[arg-type]
        with pytest.raises(TtrpcError) as err:
            await relay.forward("State", b"", ctx("State"))
        assert err.value.code == Code.UNAVAILABLE
        assert "cannot reach the agent of vm vm-silent" in str(err.value)
    asyncio.run(main())
