"""Owns: ttrpc address strings and how they map to AF_UNIX socket names.

Accepted forms:
  /path or relative/path        a filesystem socket
  unix:///path, ttrpc+unix:///path   the same, as containerd shims print it
  @name, unix://@name, \\0name   a Linux abstract socket (stored as "\\0name")
"""
from __future__ import annotations

_PREFIXES = ("ttrpc+unix://", "unix://")


def socket_name(address: str) -> str:
    """The AF_UNIX name for `address` (a path, or "\\0..." for an abstract socket)."""
    if not address:
        raise ValueError("empty ttrpc address")
    rest = address
    for prefix in _PREFIXES:
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
            break
    else:
        if "://" in rest:
            # vsock://, hvsock:// etc. are VM transports we do not dial from the host.
            raise ValueError(f"unsupported ttrpc address scheme: {address!r}")
    if not rest:
        raise ValueError(f"ttrpc address has no path: {address!r}")
    if rest[0] == "@":
        return "\0" + rest[1:]
    return rest


def is_abstract(name: str) -> bool:
    return name.startswith("\0")


def display(name: str) -> str:
    """Human/log form of a socket name (abstract names shown with '@')."""
    return "@" + name[1:] if is_abstract(name) else name
