"""Owns: identifiers and names that arrive on the wire: generation and strict validation.

Ids end up in filesystem paths (state dir, bundles, shim sockets) and in runc ids, so they are
checked against a strict pattern before any use; anything else is refused with a message that
says what was expected.  Names (pod/container metadata) never reach a path but are bounded.
"""
from __future__ import annotations

import re
import secrets

ID_RE = re.compile(r"[0-9a-f]{64}")
# An id prefix as CRI clients (crictl) pass them: at least 6 hex chars.
ID_PREFIX_RE = re.compile(r"[0-9a-f]{6,64}")
NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
MAX_NAME = 253


class InvalidInput(ValueError):
    """A request field is malformed; maps to INVALID_ARGUMENT."""


def new_id() -> str:
    return secrets.token_hex(32)


def check_id(value: str, what: str = "id") -> str:
    """`value` if it is a full engine id (64 lowercase hex chars), else InvalidInput."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} is empty")
    if not ID_RE.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidInput(f"{what} {shown!r} is malformed: expected 64 lowercase hex characters")
    return value


def check_id_ref(value: str, what: str = "id") -> str:
    """A full id or a unique-prefix reference (6..64 hex chars)."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} is empty")
    if not ID_PREFIX_RE.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidInput(f"{what} {shown!r} is malformed: expected 6 to 64 lowercase hex characters")
    return value


def check_name(value: str, what: str, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidInput(f"{what} is required")
        return value
    if len(value) > MAX_NAME:
        raise InvalidInput(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}")
    if not NAME_RE.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidInput(f"{what} {shown!r} is malformed: use letters, digits, '.', '_' and '-', "
                           "starting and ending with a letter or digit")
    return value
