"""Tests of the cached pause binary and busybox rootfs (bench/runtimes/assets.py)."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from bench.runtimes import assets


def test_build_then_cached_noop(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    pause = assets.ensure_pause(cache)
    rootfs = assets.ensure_rootfs(cache)
    assert pause.is_file() and os.access(pause, os.X_OK)
    assert (rootfs / "bin" / "busybox").is_file()
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    assert (rootfs / "pause").read_bytes() == pause.read_bytes()
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        assert (rootfs / d).is_dir()
    # no temp dirs left behind by the atomic build
    assert sorted(p.name for p in cache.iterdir()) == sorted([pause.parent.name, rootfs.name])
    stamp = (pause.stat().st_ino, pause.stat().st_mtime_ns,
             (rootfs / "bin").stat().st_ino, (rootfs / "bin").stat().st_mtime_ns)

    def no_build(*a, **k):
        raise AssertionError(f"rebuilt: {a}")

    monkeypatch.setattr(assets.subprocess, "run", no_build)
    assert assets.ensure_pause(cache) == pause
    assert assets.ensure_rootfs(cache) == rootfs
    assert assets.cached_pause(cache) == pause and assets.cached_rootfs(cache) == rootfs
    assert stamp == (pause.stat().st_ino, pause.stat().st_mtime_ns,
                     (rootfs / "bin").stat().st_ino, (rootfs / "bin").stat().st_mtime_ns)


def test_cached_is_none_before_build(tmp_path):
    assert assets.cached_pause(tmp_path) is None
    assert assets.cached_rootfs(tmp_path) is None


def test_changed_source_gets_new_key(tmp_path, monkeypatch):
    src = tmp_path / "pause.c"
    src.write_text(assets.PAUSE_SOURCE.read_text() + "\n/* changed */\n")
    old = assets.pause_key()
    monkeypatch.setattr(assets, "PAUSE_SOURCE", src)
    assert assets.pause_key() != old


def test_compile_error_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "pause.c"
    src.write_text("int main( {")
    monkeypatch.setattr(assets, "PAUSE_SOURCE", src)
    cache = tmp_path / "cache"
    with pytest.raises(assets.AssetError, match="gcc failed"):
        assets.ensure_pause(cache)
    assert list(cache.iterdir()) == []


def test_pause_sleeps_and_exits_zero_on_term(tmp_path):
    pause = assets.ensure_pause(tmp_path)
    assert subprocess.run([pause, "-v"], capture_output=True, text=True).stdout.startswith(
        "chainbench-pause")
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen([pause])
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(0.2)  # still sleeping
            p.send_signal(sig)
            assert p.wait(5) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cli_builds_and_prints(tmp_path, capsys):
    assert assets.main(["--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rootfs " in out and "pause " in out
    assert assets.cached_pause(tmp_path) is not None
