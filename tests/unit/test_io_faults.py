"""Real host I/O faults under a virtio backend reach the guest as the device's error status, are
counted and logged, and never stop the device: a full filesystem (ENOSPC), an image truncated under
the running device, a block device that fails every request (EIO), a UDP peer that went away."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.rigs.virtio_block import IMAGE, Request, submit
from tests.unit.rigs.virtio_mmio import MmioDriver
from tests.unit.rigs.virtqueue import Arena, Ring
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlock,
)
from vmscope.virtio.mmio import VirtioMmioTransport
from vmscope.virtio.net_backends import UdpBackend

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs / creating a dm device needs root")


def make(memory: GuestMemory, image: Path) -> tuple[VirtioBlock, MmioDriver]:
    disk = VirtioBlock(memory, image)
    return disk, MmioDriver(VirtioMmioTransport(disk), memory, Arena(memory))


def run(driver: MmioDriver, ring: Ring, request: Request) -> None:
    driver.notify(0)
    assert [head for head, _ in ring.take_used()] == [request.head]


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.for_size(8 << 20)
    yield ram
    ram.close()


@root_only
def test_a_full_filesystem_gives_the_guest_ioerr_and_the_device_goes_on(
    memory: GuestMemory, small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = small_tmpfs / "disk.img"
    with open(image, "wb") as stream:
        stream.truncate(2 << 20)  # sparse: 2 MiB of disk on a 256 KiB filesystem
    disk, driver = make(memory, image)
    (ring,) = driver.init()
    chunk = os.urandom(32 * 1024)
    statuses = []
    with caplog.at_level(logging.WARNING, logger="vmscope.virtio.block"):
        for sector in range(0, 1024, len(chunk) // 512):
            request = submit(ring, VIRTIO_BLK_T_OUT, sector, out=chunk)
            run(driver, ring, request)
            statuses.append(request.status)
    assert statuses[0] == VIRTIO_BLK_S_OK
    assert statuses[-1] == VIRTIO_BLK_S_IOERR  # the filesystem filled up on the way
    assert set(statuses) == {VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR}
    assert disk.host_io_errors == statuses.count(VIRTIO_BLK_S_IOERR) == disk.io_errors
    assert any(
        "No space left on device" in r.getMessage() or "short transfer" in r.getMessage()
        for r in caplog.records
    )
    read_back = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
    run(driver, ring, read_back)
    assert read_back.status == VIRTIO_BLK_S_OK and read_back.data() == chunk[:512]
    disk.close()


def test_an_image_truncated_under_the_device_fails_reads_with_ioerr(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(IMAGE)
    disk, driver = make(memory, image)
    (ring,) = driver.init()
    os.truncate(image, 1024)  # another process shrinks the image while the VM runs
    request = submit(ring, VIRTIO_BLK_T_IN, 8, in_length=1024)
    run(driver, ring, request)
    assert request.status == VIRTIO_BLK_S_IOERR
    assert disk.host_io_errors == 1
    early = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
    run(driver, ring, early)
    assert early.status == VIRTIO_BLK_S_OK and early.data() == IMAGE[:512]
    disk.close()


@pytest.fixture
def failing_block_device() -> Iterator[Path]:
    name = f"vmscope-eio-{os.getpid()}"
    created = subprocess.run(
        ["dmsetup", "create", name, "--table", "0 2048 error"], capture_output=True, text=True, check=False
    )
    if created.returncode != 0:
        pytest.skip(f"no device-mapper error target here: {created.stderr.strip()}")
    try:
        yield Path("/dev/mapper") / name
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["dmsetup", "remove", "--retry", name], check=False, capture_output=True)


@root_only
def test_a_block_device_that_fails_with_eio_gives_the_guest_ioerr(
    memory: GuestMemory, failing_block_device: Path
) -> None:
    disk, driver = make(memory, failing_block_device)
    (ring,) = driver.init()
    for request_type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
        if request_type == VIRTIO_BLK_T_IN:
            request = submit(ring, request_type, 0, in_length=512)
        else:
            request = submit(ring, request_type, 0, out=b"x" * 512)
        run(driver, ring, request)
        assert request.status == VIRTIO_BLK_S_IOERR
    assert disk.host_io_errors >= 1
    disk.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_udp_peer_that_goes_away_costs_dropped_frames_not_a_crash() -> None:
    left_port, right_port = free_udp_port(), free_udp_port()
    left = UdpBackend(left_port, right_port)
    right = UdpBackend(right_port, left_port)
    try:
        assert left.send(b"frame one")
        assert right.receive() == b"frame one"
        right.close()  # the peer VM was killed
        for _ in range(3):
            left.send(b"into the void")  # lost, as on a wire without a receiver
            assert left.receive() is None  # an ICMP error, where the host reports one, is counted, not raised
        assert left.stats.frames_sent + left.stats.send_dropped == 4
    finally:
        left.close()
        right.close()
