"""The guest image: contents, caching, and the agent running from it (chroot, no VM needed)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client
from bench.vm import initramfs
from bench.vm.agent import SERVICE


@pytest.fixture(scope="module")
def image() -> initramfs.InitramfsInfo:
    return initramfs.build()


def test_build_is_cached_and_keyed(image: initramfs.InitramfsInfo) -> None:
    again = initramfs.build()
    assert again == image
    assert image.key == initramfs.build_key() and image.path.is_file()
    # uncompressed newc cpio: a TCG guest gunzips at ~1/11 host speed
    assert image.path.read_bytes()[:6] == b"070701" and image.path.name == "initramfs.cpio"


def test_image_contents(image: initramfs.InitramfsInfo, tmp_path: Path) -> None:
    raw = image.path.read_bytes()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=tmp_path, check=True)
    for f in ("init", "bin/busybox", "bin/sh", "usr/bin/python3.11", "usr/lib/python311.zip",
              "lib64/ld-linux-x86-64.so.2", initramfs.MANIFEST.lstrip("/")):
        assert (tmp_path / f).exists(), f
    assert (tmp_path / "dev/console").is_char_device()
    names = (tmp_path / initramfs.MANIFEST.lstrip("/")).read_text().split()
    assert "bench.vm.agent" in names and "asyncio" in names
    assert "ssl" not in names  # excluded: it would drag in libssl + libcrypto
    assert not list(tmp_path.rglob("libcrypto*"))
    init = (tmp_path / "init").read_text()
    assert "bench.vm.agent" in init
    if image.kernel.startswith("tiny:"):
        assert "insmod" not in init and not (tmp_path / initramfs.GUEST_MODULE_DIR).exists()
    # the uncompressed image stays small enough to unpack quickly under TCG
    assert len(raw) < 24 * 2**20


def test_agent_runs_from_the_image(image: initramfs.InitramfsInfo, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=image.path.read_bytes(),
                   cwd=root, check=True)
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    proc = subprocess.Popen([chroot, str(root), "/usr/bin/python3.11", "-P", "-s", "-S", "-B",
                             "-c", initramfs.AGENT_MAIN, "--listen", "/tmp/agent.sock"],
                            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                            stderr=subprocess.PIPE)
    sock = root / "tmp/agent.sock"

    async def main() -> None:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        c = await Client.connect(str(sock))
        try:
            conn = await c.call(SERVICE, "Connect", pb.ConnectRequest(), pb.ConnectResponse)
            assert conn.shim_pid > 0
            spec = any_pb2.Any(type_url="x/runtime-spec/1/Process",
                               value=json.dumps({"args": ["sh", "-c", "exit 4"]}).encode())
            await c.call(SERVICE, "Create", pb.CreateTaskRequest(id="c", options=spec),
                         pb.CreateTaskResponse)
            await c.call(SERVICE, "Start", pb.StartRequest(id="c"), pb.StartResponse)
            w = await c.call(SERVICE, "Wait", pb.WaitRequest(id="c"), pb.WaitResponse,
                             timeout=30)
            assert w.exit_status == 4
        finally:
            await c.close()

    try:
        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(10)
    assert not sock.exists()
