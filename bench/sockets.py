"""Owns: probing unix sockets: does a server still listen behind a socket file?

Kept free of heavy imports: the microVM shim's `start` path uses it, and every millisecond of
its interpreter start-up lands in RunPodSandbox.
"""
from __future__ import annotations

import socket


def socket_answers(path: str, timeout: float = 0.5) -> bool:
    """True when something accepts connections on the unix socket `path` (a stale socket file
    left by a killed server refuses them)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
