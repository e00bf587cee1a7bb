"""The guest kernel: which one is used (tiny / stock fallback), unpacking Debian's bzImage, the
stock kernel's module set, and a real stock-kernel microVM answering Task calls under QEMU."""
from __future__ import annotations

import asyncio
import gzip
import json
import lzma
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from bench.doctor import accel_mode, tool_versions
from bench.rpc.pb import task_v2_pb2 as pb
from bench.vm import initramfs, kernel
from bench.vm.qemu import TASK_SERVICE, MicroVM, VMConfig, host_tsc_khz

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def _elf(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding `notes` (name, type, desc)."""
    body = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        body += struct.pack("<III", len(n), len(desc), ntype)
        body += n + b"\0" * (-len(n) % 4) + desc + b"\0" * (-len(desc) % 4)
    phoff, phentsize = 64, 56
    note_off = phoff + phentsize
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    hdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, phentsize, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(body), len(body), 4)
    return hdr + ph + body


PVH = _elf([(b"GNU", 3, b"\1" * 20), (b"Xen", kernel.XEN_ELFNOTE_PHYS32_ENTRY, b"\0" * 4)])


def test_pvh_note_detection() -> None:
    assert kernel.has_pvh_note(PVH)
    assert not kernel.has_pvh_note(_elf([(b"Xen", 17, b"\0" * 4), (b"GNU", 18, b"")]))
    assert not kernel.has_pvh_note(b"MZ" + b"\0" * 100)


@pytest.mark.parametrize("fmt", ["xz", "gzip"])
def test_extract_vmlinux_from_a_bzimage_layout(fmt: str) -> None:
    # setup code, then a payload whose first false start (the magic alone) must be skipped,
    # then the real stream followed by the build's padding and 4-byte size
    payload = lzma.compress(PVH, format=lzma.FORMAT_XZ) if fmt == "xz" else \
        gzip.compress(PVH, mtime=0)
    decoy = payload[:6] + b"garbage"
    image = b"MZ" + os.urandom(3000).replace(payload[:3], b"xyz") + decoy + payload + \
        b"\0" * 7 + struct.pack("<I", len(PVH))
    assert kernel.extract_vmlinux(image) == PVH
    assert kernel.extract_vmlinux(PVH) == PVH  # already an ELF
    with pytest.raises(kernel.KernelBuildError):
        kernel.extract_vmlinux(b"MZ" + b"\0" * 4096)


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    rel = "9.9.9-test-amd64"
    base = tmp_path / rel
    base.mkdir()
    (base / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n")
    (base / "modules.builtin").write_text("kernel/drivers/char/hw_random/virtio-rng.ko\n")
    order = [p.name for p in kernel.module_load_order(rel, modules_root=tmp_path)]
    assert order == ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko", "virtio_console.ko"]
    assert kernel.module_load_order(rel, modules_root=tmp_path)[0] == \
        base / "kernel/drivers/virtio/virtio_ring.ko"
    # a built-in driver needs no file
    assert kernel.module_load_order(rel, ("virtio-rng",), modules_root=tmp_path) == []
    with pytest.raises(kernel.KernelBuildError, match="vsock"):
        kernel.module_load_order(rel, ("vsock",), modules_root=tmp_path)


def test_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernel.ENV, raising=False)
    assert kernel.mode() == "auto"
    monkeypatch.setenv(kernel.ENV, "Stock")
    assert kernel.mode() == "stock"
    monkeypatch.setenv(kernel.ENV, "bzimage")
    with pytest.raises(kernel.KernelBuildError, match="auto, tiny, stock"):
        kernel.mode()


def test_unbuildable_tiny_kernel_falls_back_to_stock(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """Real Debian kernel from /boot (CI installs linux-image-amd64); no linux-source here."""
    monkeypatch.setenv("CHAINBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(kernel.ENV, raising=False)
    monkeypatch.setattr(kernel, "SOURCE_TARBALL", tmp_path / "no-linux-source.tar.xz")
    assert kernel.find_tiny() is None and "missing" in kernel.tiny_unbuildable()
    found = kernel.find_kernel()
    assert found is not None and found.kind == "stock", "apt-get install linux-image-amd64"
    assert found.note.startswith("fallback: tiny kernel") and found.label.startswith("stock:")
    assert [p.name for p in found.modules][-2:] == ["virtio_mmio.ko", "virtio_console.ko"]
    assert found.path.is_relative_to(tmp_path) and found.pvh  # Debian's has the PVH note
    assert kernel.build(quiet=True) == found
    monkeypatch.setenv(kernel.ENV, "tiny")
    assert kernel.find_kernel() is None
    with pytest.raises(kernel.KernelBuildError, match="linux-source"):
        kernel.build(quiet=True)


def test_failed_build_is_remembered(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHAINBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(kernel.ENV, raising=False)
    if not kernel.SOURCE_TARBALL.exists():
        pytest.fail("linux-source-6.1 is part of the set-up (make apt)")
    marker = tmp_path / "kernels" / f"build-{kernel.build_key()}.failed"
    marker.parent.mkdir(parents=True)
    marker.write_text("make -j2 vmlinux failed (exit 2)\n")
    assert "build failed" in kernel.tiny_unbuildable()
    found = kernel.find_kernel()
    assert found is not None and found.kind == "stock" and "exit 2" in found.note
    assert kernel.build(quiet=True) == found  # no second 5-minute attempt
    assert kernel.main(["--retry", "--stock"]) == 0  # --stock: no compile in this test
    assert not marker.exists()


def test_initramfs_for_the_stock_kernel_loads_its_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernel.ENV, "stock")
    kinfo = kernel.build(quiet=True)
    image = initramfs.build(kinfo=kinfo)
    assert image.kernel == kinfo.label and image == initramfs.find_initramfs()
    monkeypatch.delenv(kernel.ENV)
    tiny_key = initramfs.build_key(kernel.KernelInfo(Path("/x/vmlinux"), "tiny", "k"))
    assert image.key != tiny_key
    raw = image.path.read_bytes()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True,
                             check=True).stdout.decode().split()
    kos = [f"{initramfs.GUEST_MODULE_DIR}/{p.name}" for p in kinfo.modules]
    assert set(kos) <= set(listing)
    init = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "init"], input=raw,
                          capture_output=True, check=True).stdout.decode()
    loads = [ln.split()[1].lstrip("/") for ln in init.splitlines() if ln.startswith("insmod ")]
    assert loads == kos
    assert init.index("insmod") < init.index("exec /usr/bin/python3.11")


def test_doctor_reports_the_kernel_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(os.environ, **{kernel.ENV: "stock"})
    out = subprocess.run([sys.executable, "-m", "bench.cli", "doctor", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    data = json.loads(out.stdout)
    gk = data["guest_kernel"]
    assert gk["kind"] == "stock" and gk["label"] == f"stock:{gk['id']}" and gk["mode"] == "stock"
    assert Path(gk["path"]).is_file() and "virtio_console.ko" in gk["modules"]
    check = next(c for c in data["checks"] if c["name"] == "guest kernel")
    assert check["ok"] and gk["label"] in check["found"]
    monkeypatch.setenv(kernel.ENV, "stock")
    assert tool_versions()["guest_kernel"] == gk["label"]


@pytest.mark.integration
@pytest.mark.slow
def test_stock_kernel_boots_to_the_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         leak_check) -> None:
    """Debian's kernel + our initramfs with its virtio modules, cold-booted under QEMU (TCG
    here): the agent answers Connect (readiness) and runs a process in the guest."""
    leak_check.watch_dir(tmp_path)
    monkeypatch.setenv(kernel.ENV, "stock")
    kinfo = kernel.build(quiet=True)
    iinfo = initramfs.build(kinfo=kinfo)
    config = VMConfig(kernel=str(kinfo.path), initrd=str(iinfo.path), accel=accel_mode(),
                      tsc_khz=host_tsc_khz())
    spec = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(
        {"args": ["sh", "-c", f'test "$(uname -r)" = {kinfo.key} || exit 9; exit 3']}).encode())

    async def main() -> None:
        vm = MicroVM("stock", tmp_path / "vm", config)
        try:
            await vm.boot(timeout=180)
            c = await vm.dial()
            try:
                await c.call(TASK_SERVICE, "Create", pb.CreateTaskRequest(id="k", options=spec),
                             pb.CreateTaskResponse, timeout=60)
                await c.call(TASK_SERVICE, "Start", pb.StartRequest(id="k"), pb.StartResponse,
                             timeout=60)
                w = await c.call(TASK_SERVICE, "Wait", pb.WaitRequest(id="k"), pb.WaitResponse,
                                 timeout=60)
                assert w.exit_status == 3, vm.serial_output()[-2000:]  # 9: not the stock kernel
            finally:
                await c.close()
        finally:
            await vm.stop()
        assert not os.path.exists(vm.socket_path)

    asyncio.run(main())
