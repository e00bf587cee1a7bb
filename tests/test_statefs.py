"""A run's state directory goes on a tmpfs of its own (bench.statefs), as /run on a host."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.processes import mounts_below, remove_tree
from bench.statefs import MOUNTED, filesystem_of, mount_tmpfs


def test_filesystem_of_finds_the_mount_that_holds_a_path():
    assert filesystem_of("/proc") == "proc"
    assert filesystem_of("/proc/self/status") == "proc"
    assert filesystem_of("/") not in ("proc", "unknown")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")
def test_mount_tmpfs_once_and_remove_tree_takes_it_away(tmp_path: Path):
    d = tmp_path / "run"
    d.mkdir()
    was = filesystem_of(d)
    try:
        got = mount_tmpfs(d)
        if was == "tmpfs":
            assert got == "tmpfs" and mounts_below(d) == []
        else:
            assert got == MOUNTED and mounts_below(d) == [str(d.resolve())]
        assert filesystem_of(d / "state.json") == "tmpfs"
        assert mount_tmpfs(d) == "tmpfs"  # already on one: no second mount
        assert len(mounts_below(d)) <= 1
        (d / "state.json").write_text("{}")
    finally:
        remove_tree(d)
    assert not d.exists() and mounts_below(d) == []


def test_a_refused_mount_is_reported_not_raised(tmp_path: Path, monkeypatch):
    """Without CAP_SYS_ADMIN (a container, a non-root user) the run goes on, on the plain
    directory, and says so in run.json."""
    from bench.sandboxer import nspin

    def refuse(*_a, **_k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(nspin, "mount", refuse)
    d = tmp_path / "run"
    d.mkdir()
    got = mount_tmpfs(d)
    if filesystem_of(d) == "tmpfs":  # tmp_path itself on a tmpfs: nothing to mount
        assert got == "tmpfs"
    else:
        assert got == f"{filesystem_of(d)} (tmpfs mount failed: Operation not permitted)"
        assert mounts_below(d) == []
