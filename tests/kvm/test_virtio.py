"""Virtio devices on real KVM, driven by a freestanding virtio-mmio driver (guest_src/virtio_driver.c).

The guest finds its devices from the ``virtio_mmio.device=`` entries vmscope appends to its command
line, starts them (VERSION_1 only, plus FLUSH on a disk) and reports on COM1; the tests judge the
host side: image bytes, request traces and the thread that served them, frames on a UDP link, the
console's file backend, and the VMM surviving a malformed queue and a SIGKILL right after a flush.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmscope
from vmscope.guest.build import build_runtime_guest
from vmscope.virtio import RequestTrace, VirtioBlock, VirtioNet, VirtioRng
from vmscope.virtio.net import format_mac
from vmscope.vmm.machine import Machine, RunResult
from vmscope.vmm.platform import install_platform_devices
from vmscope.vmm.virtio_setup import install_virtio_devices

GUEST_SRC = Path(__file__).parent / "guest_src" / "virtio_driver.c"
SRC = str(Path(vmscope.__file__).resolve().parents[1])  # the vmscope these tests import
STATUS_OK = 33  # debug_exit(0x10)
STATUS_IO_ERROR = 35  # debug_exit(0x11): a request completed with a non-OK status
SECTOR = 512
BLOCK = 4096
FILLER = 0xEE


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_runtime_guest("virtio-driver", [GUEST_SRC], cflags=("-Wextra", "-Werror"))


def make_image(path: Path, size: int = 4 << 20) -> Path:
    path.write_bytes(bytes([FILLER]) * size)
    return path


def pattern(seed: int, offset: int, length: int) -> bytes:
    """What the guest writes: each 8-byte word at disk offset o holds (seed << 48) | o."""
    return b"".join(struct.pack("<Q", seed << 48 | o) for o in range(offset, offset + length, 8))


def run_guest(
    guest: Path,
    tmp_path: Path,
    cmdline: str,
    *,
    disks: tuple[str, ...] = (),
    nets: tuple[str, ...] = (),
    console: str | None = None,
    rng: bool = False,
    iothreads: bool = True,
) -> tuple[RunResult, str, list[RequestTrace], list[object]]:
    """One in-process run: (result, serial output, blk request traces, the virtio devices)."""
    serial_log = tmp_path / f"serial-{time.monotonic_ns()}.log"
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial=f"file:{serial_log}")
        attached = install_virtio_devices(
            machine, disks=disks, nets=nets, console=console, rng=rng, iothreads=iothreads
        )
        machine.load(guest, cmdline=cmdline)
        result = machine.run(timeout=30)
        devices = [attachment.device for attachment in attached]
        traces = [t for d in devices if isinstance(d, VirtioBlock) for t in d.traces()]
    return result, serial_log.read_text(), traces, devices


# -- virtio-blk ----------------------------------------------------------------------------------


@pytest.mark.guest_support(
    "PVH ELF (bundled runtime)", devices="virtio-blk over virtio-mmio, I/O thread on and off"
)
@pytest.mark.parametrize("iothreads", [True, False], ids=["iothreads-on", "iothreads-off"])
def test_blk_writes_land_at_their_offsets_and_requests_run_on_the_expected_thread(
    guest: Path, tmp_path: Path, iothreads: bool
) -> None:
    image = make_image(tmp_path / "disk.img")
    blocks, first_sector, seed = 6, 40, 0x1234
    result, serial, traces, devices = run_guest(
        guest,
        tmp_path,
        f"mode=blk blocks={blocks} sector={first_sector} seed={seed:#x} irq=1",
        disks=(str(image),),
        iothreads=iothreads,
    )
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    assert f"blk: read back {blocks} blocks OK" in serial

    data = image.read_bytes()
    start, end = first_sector * SECTOR, first_sector * SECTOR + blocks * BLOCK
    assert data[start:end] == pattern(seed, start, end - start)
    assert data[:start] == bytes([FILLER]) * start  # nothing written outside the range
    assert data[end:] == bytes([FILLER]) * (len(data) - end)

    # get-id, the writes, the flush, the reads: in order, all OK, all on one thread
    kinds = [trace.type_name for trace in traces]
    assert kinds == ["get-id"] + ["write"] * blocks + ["flush"] + ["read"] * blocks
    assert all(trace.status == 0 for trace in traces)
    assert [t.sector for t in traces if t.type_name == "write"] == [
        first_sector + 8 * b for b in range(blocks)
    ]
    expected_thread = "io:virtio-blk0" if iothreads else "vcpu0"
    assert {trace.thread for trace in traces} == {expected_thread}

    # irq=1: the guest took every completion only after the device's interrupt (irqfd with I/O
    # threads, KVM_IRQ_LINE without), acknowledging InterruptStatus bit 0 (used buffer)
    found = re.search(r"blk: (\d+) interrupts on IRQ 5, InterruptStatus bits seen (\w+)", serial)
    assert found, serial
    assert int(found.group(1)) >= 1 and int(found.group(2), 16) == 1
    assert devices[0].stats.interrupts >= len(traces)  # type: ignore[attr-defined]


def test_host_tools_see_the_vcpu_and_io_threads_by_name(guest: Path, tmp_path: Path) -> None:
    """While a guest keeps its disk busy, the kernel's names of the VMM's threads (what ``top -H``
    and ``ps -L`` show) include the vCPU and the disk's I/O thread."""
    image = make_image(tmp_path / "disk.img")

    def thread_names() -> set[str]:
        names = set()
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                names.add((task / "comm").read_text().strip())
        return names

    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial=f"file:{tmp_path / 'serial.log'}")
        (attachment,) = install_virtio_devices(machine, disks=(str(image),))
        machine.load(guest, cmdline="mode=bench-io bs=4096 depth=4 count=4000000")
        machine.start()
        try:
            deadline = time.monotonic() + 20
            while not attachment.device.traces() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.01)
            names = thread_names()
        finally:
            machine.stop()
    assert {"vcpu0", "io:virtio-blk0"} <= names, names


def test_get_id_returns_the_configured_serial_cut_to_20_bytes(guest: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 1 << 20)
    result, serial, traces, _ = run_guest(
        guest, tmp_path, "mode=blk blocks=1", disks=(f"{image},serial=abcdefghijklmnopqrstuvwxyz",)
    )
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    # 20 id bytes plus the status byte; 1 MiB = 2048 sectors from the config space
    assert "blk: id 'abcdefghijklmnopqrst' (used length 21), capacity 2048 sectors" in serial
    assert traces[0].type_name == "get-id" and traces[0].status == 0


def test_read_only_disk_fails_writes_with_ioerr_and_keeps_the_image(guest: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 1 << 20)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    result, serial, traces, _ = run_guest(
        guest, tmp_path, "mode=blk blocks=2", disks=(f"{image},readonly,serial=ro-disk",)
    )
    assert result.exit_status == STATUS_IO_ERROR, (result.reason, serial)
    assert "blk: id 'ro-disk'" in serial  # reads still work
    assert "blk: write of block 0 (sector 0) failed: status 1 (IOERR)" in serial
    assert [(t.type_name, t.status) for t in traces] == [("get-id", 0), ("write", 1)]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_flushed_blocks_survive_sigkill_of_the_vmm(guest: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    serial_log = tmp_path / "serial.log"
    blocks, first_sector, seed = 64, 8, 7
    process = subprocess.Popen(
        [sys.executable, "-m", "vmscope", "run", "--elf", str(guest), "--disk", str(image),
         "--serial", f"file:{serial_log}", "--timeout", "60",
         "--cmdline", f"mode=blk blocks={blocks} sector={first_sector} seed={seed} park=1"],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    flushed = f"blk: flushed {blocks} blocks from sector {first_sector}\r\n".encode()
    try:
        deadline = time.monotonic() + 30
        # the line is printed after the FLUSH request completed; the guest halts after it
        while flushed not in (serial_log.read_bytes() if serial_log.exists() else b""):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the guest never reported its flush"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)  # no clean shutdown: no close, no final fsync
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    start = first_sector * SECTOR
    data = image.read_bytes()
    assert data[start : start + blocks * BLOCK] == pattern(seed, start, blocks * BLOCK)


def test_malformed_queue_sets_needs_reset_and_the_vmm_runs_on(
    guest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = make_image(tmp_path / "disk.img", 1 << 20)
    with caplog.at_level(logging.ERROR, logger="vmscope.virtio"):
        result, serial, traces, devices = run_guest(
            guest, tmp_path, "mode=evil irq=1", disks=(f"{image},serial=evil",)
        )
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    # the guest saw NEEDS_RESET (0x40) and the configuration-change interrupt bit, reset the
    # device, and got a good GET_ID from it afterwards
    found = re.search(r"evil: device status ([0-9a-f]+): NEEDS_RESET, InterruptStatus 2", serial)
    assert found and int(found.group(1), 16) & 0x40, serial
    assert "evil: after reset: id 'evil'" in serial and "evil: device works again" in serial
    disk = devices[0]
    assert isinstance(disk, VirtioBlock)
    assert disk.stats.errors == 1
    assert [(t.type_name, t.status) for t in traces] == [("get-id", 0)]  # the bad chain was never served
    messages = [r.getMessage() for r in caplog.records if r.name == "vmscope.virtio"]
    assert any("outside guest RAM" in m and "needs a reset" in m and "virtio-blk0" in m for m in messages)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_the_driver_also_runs_against_qemu_virtio_blk(guest: Path, tmp_path: Path) -> None:
    # a cross-check of the driver against another implementation (QEMU microvm appends
    # virtio_mmio.device= entries with acpi=off; its transports are legacy unless told otherwise)
    image = make_image(tmp_path / "disk.img", 1 << 20)
    run = subprocess.run(
        ["qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off,rtc=off", "-enable-kvm",
         "-cpu", "host,-arch-capabilities", "-nodefaults", "-no-reboot", "-nographic", "-serial", "stdio",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-global", "virtio-mmio.force-legacy=false",
         "-kernel", str(guest), "-append", "mode=blk blocks=3 sector=16 seed=9",
         "-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if run.returncode != STATUS_OK and "Could not access KVM" in run.stderr:
        pytest.skip(f"QEMU cannot use KVM here: {run.stderr.strip()}")
    assert run.returncode == STATUS_OK, run.stdout + run.stderr
    assert "blk: read back 3 blocks OK" in run.stdout
    start = 16 * SECTOR
    assert image.read_bytes()[start : start + 3 * BLOCK] == pattern(9, start, 3 * BLOCK)


# -- virtio-net, console, rng --------------------------------------------------------------------


def free_udp_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_two_vms_on_a_udp_link_exchange_frames(guest: Path, tmp_path: Path) -> None:
    port_a, port_b = free_udp_ports(2)
    names = ("a", "b")
    specs = {"a": f"udp:{port_a}:{port_b}", "b": f"udp:{port_b}:{port_a}"}
    machines: dict[str, Machine] = {}
    nets: dict[str, VirtioNet] = {}
    logs = {name: tmp_path / f"serial-{name}.log" for name in names}
    results: dict[str, RunResult | None] = {}
    try:
        for name in names:
            machine = machines[name] = Machine(mem="64M")
            install_platform_devices(machine, serial=f"file:{logs[name]}")
            (attachment,) = install_virtio_devices(machine, nets=[specs[name]])
            assert isinstance(attachment.device, VirtioNet)
            nets[name] = attachment.device
            machine.load(guest, cmdline=f"mode=net payload=greetings_from_{name} timeout_ms=20000")
        for name in names:
            machines[name].start()
        for name in names:
            results[name] = machines[name].wait(40)
    finally:
        for machine in machines.values():
            machine.close()
    serial = {name: logs[name].read_text() for name in names}
    for name, peer in (("a", "b"), ("b", "a")):
        result = results[name]
        assert result is not None and result.exit_status == STATUS_OK, (name, result, serial[name])
        peer_mac = format_mac(nets[peer].mac)
        # the peer's frame: 14-byte Ethernet header, 8 bytes of magic and flag, the payload
        payload = f"greetings from {peer}"
        expected = f"net: received {22 + len(payload)} bytes from {peer_mac}: '{payload}'"
        assert expected in serial[name], serial[name]
        assert nets[name].counters.tx_frames >= 1 and nets[name].counters.rx_frames >= 1


def test_console_line_arrives_in_the_file_backend(guest: Path, tmp_path: Path) -> None:
    output = tmp_path / "hvc0.txt"
    result, serial, _, _ = run_guest(
        guest, tmp_path, "mode=console irq=1 text=line_through_virtio-console", console=f"file:{output}"
    )
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    assert output.read_text() == "line through virtio-console\n"
    assert "console: sent 28 bytes" in serial
    assert "line through virtio-console" not in serial  # it went through the virtio queue, not COM1


def test_rng_returns_64_random_bytes(guest: Path, tmp_path: Path) -> None:
    result, serial, _, devices = run_guest(guest, tmp_path, "mode=rng", rng=True)
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    found = re.search(r"rng: 64 bytes: ([0-9a-f]+)", serial)
    assert found, serial
    data = bytes.fromhex(found.group(1))
    assert len(data) == 64
    assert len(set(data)) > 1
    rng = devices[0]
    assert isinstance(rng, VirtioRng) and rng.bytes_served == 64


@pytest.mark.guest_support(
    "PVH ELF (bundled runtime)", devices="virtio-blk, virtio-console, virtio-rng over virtio-mmio"
)
def test_one_guest_drives_several_devices_in_slot_order(guest: Path, tmp_path: Path) -> None:
    # disks first, then console, then rng: slots 0, 1, 2 at 0xfeb00000 + n * 0x1000, GSIs 5, 6, 7
    image = make_image(tmp_path / "disk.img", 1 << 20)
    output = tmp_path / "hvc0.txt"
    result, serial, _, _ = run_guest(
        guest, tmp_path, "mode=rng,console,blk irq=1 blocks=1", disks=(str(image),),
        console=f"file:{output}", rng=True,
    )  # fmt: skip
    assert result.exit_status == STATUS_OK, (result.reason, serial)
    assert "virtio: feb00000 irq 5 device id 2" in serial
    assert "virtio: feb01000 irq 6 device id 3" in serial
    assert "virtio: feb02000 irq 7 device id 4" in serial
    assert "rng: 64 bytes" in serial and "blk: read back 1 blocks OK" in serial
    assert output.read_text() == "hello from the virtio test guest\n"


def test_a_recorded_profile_splits_block_request_latency_into_its_parts(guest: Path, tmp_path: Path) -> None:
    from vmscope.profiler.model import IO_PART_NAMES
    from vmscope.profiler.recorder import ProfileRecorder
    from vmscope.profiler.report import io_latency_rows

    image = make_image(tmp_path / "disk.img")
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial="none")
        install_virtio_devices(machine, disks=(str(image),))
        machine.load(guest, cmdline="mode=blk blocks=4 sector=8 seed=0x77 irq=1")
        recorder = ProfileRecorder(machine)
        recorder.start()
        result = machine.run(timeout=30)
        profile = recorder.finish()
    assert result.exit_status == STATUS_OK
    requests = [span for span in profile.spans if span.track == "io:virtio-blk0"]
    assert requests and all(span.name.startswith("request:") for span in requests)
    for span in requests:
        assert span.args is not None and span.args["thread"] == "io:virtio-blk0"
        parts = [int(span.args[name]) for name in IO_PART_NAMES]
        assert all(part >= 0 for part in parts)
        assert sum(parts) == span.end_ns - span.start_ns  # the parts add up to the request's latency
    kinds = {row[1] for row in io_latency_rows(profile)}
    assert {"write", "read", "flush"} <= kinds
