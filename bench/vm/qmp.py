"""Owns: the QEMU Machine Protocol (QMP) client used to watch, snapshot and stop microVMs.

QMP is JSON lines over a unix socket: a greeting, `qmp_capabilities`, then commands answered by
`{"return": ...}` or `{"error": ...}`, with asynchronous `{"event": ...}` lines interleaved.
One command is in flight at a time (callers serialize on a lock).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class QMPError(RuntimeError):
    pass


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> "QMP":
        """Dial the QMP socket (retrying while QEMU has not created it yet) and negotiate."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise QMPError(f"QMP socket {path}: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        q = cls(reader, writer)
        try:
            greeting = await asyncio.wait_for(q._read(), max(0.1, deadline - time.monotonic()))
            if "QMP" not in greeting:
                raise QMPError(f"unexpected QMP greeting {greeting!r}")
            await q.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            await q.close()
            raise
        return q

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float | None = 30.0) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        async with self._lock:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()

            async def answer() -> Any:
                while True:
                    reply = await self._read()
                    if "event" in reply:
                        self.events.append(reply)
                        continue
                    if "error" in reply:
                        err = reply["error"]
                        raise QMPError(f"{command}: {err.get('class')}: {err.get('desc')}")
                    return reply.get("return")

            return await asyncio.wait_for(answer(), timeout)

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The first event `name` seen since the last call (also one collected while a command
        was answered), or None after `timeout`; the events before it are dropped."""
        for i, ev in enumerate(self.events):
            if ev.get("event") == name:
                del self.events[:i + 1]
                return ev
        self.events.clear()
        deadline = time.monotonic() + timeout
        async with self._lock:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    msg = await asyncio.wait_for(self._read(), left)
                except asyncio.TimeoutError:
                    return None
                if msg.get("event") == name:
                    return msg

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
