"""virtio-blk against a temporary image file, driven through the virtio-mmio registers."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.rigs.virtio_block import IMAGE, SECTORS, Request, submit
from tests.unit.rigs.virtio_mmio import ALL, MmioDriver
from tests.unit.rigs.virtqueue import Arena, Ring
from vmscope.devices.base import RecordingInterruptLine
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.block import (
    ID_BYTES,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_GET_LIFETIME,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    RequestTrace,
    VirtioBlock,
)
from vmscope.virtio.device import VIRTIO_F_EVENT_IDX, LinePulseSignal
from vmscope.virtio.mmio import VirtioMmioTransport


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(IMAGE + b"tail")  # a trailing partial sector is not addressable
    return path


def make(memory: GuestMemory, image: Path, **options: object) -> tuple[VirtioBlock, MmioDriver]:
    disk = VirtioBlock(memory, image, **options)  # type: ignore[arg-type]
    return disk, MmioDriver(VirtioMmioTransport(disk), memory, Arena(memory))


@pytest.fixture
def blk(memory: GuestMemory, image: Path) -> Iterator[tuple[VirtioBlock, MmioDriver, Ring]]:
    disk, driver = make(memory, image)
    (ring,) = driver.init()
    yield disk, driver, ring
    disk.close()


def run(driver: MmioDriver, ring: Ring, request: Request) -> int:
    driver.notify(0)
    used = ring.take_used()
    assert [head for head, _ in used] == [request.head]
    return used[0][1]


# -- configuration -----------------------------------------------------------------------------


def test_capacity_and_features(memory: GuestMemory, image: Path) -> None:
    disk, driver = make(memory, image)
    assert driver.config(0, 8) == SECTORS
    assert driver.config(12, 4) == disk.seg_max > 0
    offered = driver.device_features()
    for bit in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert offered >> bit & 1
    assert not offered >> VIRTIO_BLK_F_RO & 1
    disk.close()
    disk, driver = make(memory, image, read_only=True)
    offered = driver.device_features()
    assert offered >> VIRTIO_BLK_F_RO & 1 and not offered >> VIRTIO_BLK_F_DISCARD & 1
    disk.close()


def test_missing_image_is_a_config_error(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        VirtioBlock(memory, tmp_path / "absent.img")


# -- data path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [1, 3])
def test_read_fills_guest_buffers_from_the_image(
    blk: tuple[VirtioBlock, MmioDriver, Ring], pieces: int
) -> None:
    disk, driver, ring = blk
    request = submit(ring, VIRTIO_BLK_T_IN, 3, in_length=1024, in_pieces=pieces)
    assert run(driver, ring, request) == 1025
    assert request.status == VIRTIO_BLK_S_OK
    assert request.data() == IMAGE[3 * 512 : 5 * 512]
    assert disk.bytes_read == 1024


def test_write_reaches_the_image(blk: tuple[VirtioBlock, MmioDriver, Ring], image: Path) -> None:
    disk, driver, ring = blk
    payload = os.urandom(1536)
    request = submit(ring, VIRTIO_BLK_T_OUT, 10, out=payload)
    assert run(driver, ring, request) == 1
    assert request.status == VIRTIO_BLK_S_OK
    assert disk.bytes_written == 1536
    content = image.read_bytes()
    assert content[10 * 512 : 13 * 512] == payload
    assert content[: 10 * 512] == IMAGE[: 10 * 512] and content[13 * 512 : len(IMAGE)] == IMAGE[13 * 512 :]


def test_neighbouring_requests_share_a_syscall_and_complete_in_order(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, driver = make(memory, image)
    (ring,) = driver.init(queue_size=32)  # room for every descriptor below
    calls: list[tuple[str, int, int]] = []
    preadv, pwritev = os.preadv, os.pwritev

    def counting_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(("read", offset, sum(len(b) for b in buffers)))
        return preadv(fd, buffers, offset)

    def counting_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(("write", offset, sum(len(b) for b in buffers)))
        return pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    monkeypatch.setattr(os, "pwritev", counting_pwritev)
    payload = os.urandom(1024)
    requests = [
        submit(ring, VIRTIO_BLK_T_IN, 2, in_length=512),
        submit(ring, VIRTIO_BLK_T_IN, 3, in_length=1024, in_pieces=3),  # continues sector 2
        submit(ring, VIRTIO_BLK_T_IN, 9, in_length=512),  # a gap: a new syscall
        submit(ring, VIRTIO_BLK_T_OUT, 20, out=payload[:512]),
        submit(ring, VIRTIO_BLK_T_OUT, 21, out=payload[512:]),  # continues sector 20
        submit(ring, VIRTIO_BLK_T_IN, SECTORS, in_length=512),  # past the end: fails alone
        submit(ring, VIRTIO_BLK_T_IN, 10, in_length=512),
    ]
    driver.notify(0)
    used = ring.take_used()
    assert used == [(r.head, w) for r, w in zip(requests, [513, 1025, 513, 1, 1, 1, 513], strict=True)]
    assert [r.status for r in requests] == [VIRTIO_BLK_S_OK] * 5 + [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    assert requests[0].data() == IMAGE[1024:1536] and requests[1].data() == IMAGE[1536:2560]
    assert requests[2].data() == IMAGE[9 * 512 : 10 * 512] and requests[6].data() == IMAGE[5120:5632]
    assert image.read_bytes()[20 * 512 : 22 * 512] == payload
    assert calls == [
        ("read", 1024, 1536),
        ("read", 9 * 512, 512),
        ("write", 20 * 512, 1024),
        ("read", 5120, 512),
    ]
    traces = disk.traces()
    assert [t.sector for t in traces] == [2, 3, 9, 20, 21, SECTORS, 10]
    assert traces[0].backend_start_ns == traces[1].backend_start_ns  # one syscall for both
    assert all(t.pickup_ns <= t.backend_start_ns <= t.backend_end_ns <= t.complete_ns for t in traces)
    assert (disk.bytes_read, disk.bytes_written, disk.io_errors) == (2560, 1024, 1)
    disk.close()


def test_indirect_request(blk: tuple[VirtioBlock, MmioDriver, Ring]) -> None:
    _, driver, ring = blk
    request = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512, indirect=True)
    assert run(driver, ring, request) == 513
    assert request.data() == IMAGE[:512]


def test_flush_fsyncs_before_the_status_is_written(
    blk: tuple[VirtioBlock, MmioDriver, Ring], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, driver, ring = blk
    request = submit(ring, VIRTIO_BLK_T_FLUSH)
    seen: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append(request.status)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run(driver, ring, request)
    assert seen == [0xFF]  # status still untouched while fsync ran
    assert request.status == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("with_flush", [True, False])
def test_write_through_without_flush_negotiated(
    memory: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch, with_flush: bool
) -> None:
    disk, driver = make(memory, image)
    accept = ALL if with_flush else ~(1 << VIRTIO_BLK_F_FLUSH)
    (ring,) = driver.init(accept)
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    for sector in (1, 2):
        request = submit(ring, VIRTIO_BLK_T_OUT, sector, out=bytes(512))
        run(driver, ring, request)
        assert request.status == VIRTIO_BLK_S_OK
    assert disk.write_through is not with_flush
    assert len(calls) == (0 if with_flush else 2)
    disk.close()


def test_get_id_returns_the_serial(memory: GuestMemory, image: Path) -> None:
    disk, driver = make(memory, image, serial="vmscope-disk-serial-number-too-long")
    (ring,) = driver.init()
    request = submit(ring, VIRTIO_BLK_T_GET_ID, in_length=ID_BYTES)
    assert run(driver, ring, request) == ID_BYTES + 1
    assert request.data() == b"vmscope-disk-serial-"
    disk.close()
    disk, driver = make(memory, image)
    (ring,) = driver.init()
    request = submit(ring, VIRTIO_BLK_T_GET_ID, in_length=ID_BYTES)
    run(driver, ring, request)
    assert request.data() == b"disk.img".ljust(ID_BYTES, b"\0")
    disk.close()


def segments(*entries: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", sector, count, flags) for sector, count, flags in entries)


def test_discard_zeroes_the_ranges(blk: tuple[VirtioBlock, MmioDriver, Ring], image: Path) -> None:
    _, driver, ring = blk
    request = submit(ring, VIRTIO_BLK_T_DISCARD, out=segments((8, 8, 0), (40, 1, 0)))
    run(driver, ring, request)
    assert request.status == VIRTIO_BLK_S_OK
    content = image.read_bytes()
    assert content[8 * 512 : 16 * 512] == bytes(8 * 512)
    assert content[40 * 512 : 41 * 512] == bytes(512)
    assert content[16 * 512 : 40 * 512] == IMAGE[16 * 512 : 40 * 512]
    assert len(content) == len(IMAGE) + 4  # hole punching keeps the size


@pytest.mark.parametrize("flags", [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes(blk: tuple[VirtioBlock, MmioDriver, Ring], image: Path, flags: int) -> None:
    _, driver, ring = blk
    request = submit(ring, VIRTIO_BLK_T_WRITE_ZEROES, out=segments((20, 3, flags)))
    run(driver, ring, request)
    assert request.status == VIRTIO_BLK_S_OK
    content = image.read_bytes()
    assert content[20 * 512 : 23 * 512] == bytes(3 * 512)
    assert content[19 * 512 : 20 * 512] == IMAGE[19 * 512 : 20 * 512]
    assert content[23 * 512 : 24 * 512] == IMAGE[23 * 512 : 24 * 512]


@pytest.mark.parametrize(
    ("request_type", "entry", "status"),
    [
        (VIRTIO_BLK_T_DISCARD, (0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, (0, 1, 0x80), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, (SECTORS - 1, 2, 0), VIRTIO_BLK_S_IOERR),
    ],
)
def test_bad_discard_segments_leave_the_image_alone(
    blk: tuple[VirtioBlock, MmioDriver, Ring],
    image: Path,
    request_type: int,
    entry: tuple[int, int, int],
    status: int,
) -> None:
    _, driver, ring = blk
    request = submit(ring, request_type, out=segments(entry))
    run(driver, ring, request)
    assert request.status == status
    assert image.read_bytes()[: len(IMAGE)] == IMAGE


def test_read_only_disk_refuses_writes(memory: GuestMemory, image: Path) -> None:
    disk, driver = make(memory, image, read_only=True)
    (ring,) = driver.init()
    for request_type, data in (
        (VIRTIO_BLK_T_OUT, bytes(512)),
        (VIRTIO_BLK_T_WRITE_ZEROES, segments((0, 1, 0))),
    ):
        request = submit(ring, request_type, 0, out=data)
        run(driver, ring, request)
        assert request.status == VIRTIO_BLK_S_IOERR
    read = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
    run(driver, ring, read)
    assert read.status == VIRTIO_BLK_S_OK and read.data() == IMAGE[:512]
    assert image.read_bytes()[: len(IMAGE)] == IMAGE
    assert disk.io_errors == 2
    disk.close()


@pytest.mark.parametrize(
    ("request_type", "sector", "length"),
    [
        (VIRTIO_BLK_T_IN, SECTORS, 512),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
        (VIRTIO_BLK_T_IN, 1 << 60, 512),
        (VIRTIO_BLK_T_OUT, SECTORS, 512),
        (VIRTIO_BLK_T_IN, 0, 100),  # not a multiple of 512
    ],
)
def test_out_of_range_and_unaligned_requests_fail_with_ioerr(
    blk: tuple[VirtioBlock, MmioDriver, Ring], image: Path, request_type: int, sector: int, length: int
) -> None:
    disk, driver, ring = blk
    if request_type == VIRTIO_BLK_T_IN:
        request = submit(ring, request_type, sector, in_length=length)
    else:
        request = submit(ring, request_type, sector, out=bytes(length))
    assert run(driver, ring, request) == 1
    assert request.status == VIRTIO_BLK_S_IOERR
    assert not disk.needs_reset
    assert image.read_bytes() == IMAGE + b"tail"


@pytest.mark.parametrize("request_type", [VIRTIO_BLK_T_GET_LIFETIME, 99])
def test_unknown_requests_are_unsupported(
    blk: tuple[VirtioBlock, MmioDriver, Ring], request_type: int
) -> None:
    disk, driver, ring = blk
    request = submit(ring, request_type, in_length=8)
    run(driver, ring, request)
    assert request.status == VIRTIO_BLK_S_UNSUPP
    assert disk.unsupported == 1


# -- notification suppression and traces ----------------------------------------------------------


def test_event_idx_suppresses_interrupts_until_used_event(memory: GuestMemory, image: Path) -> None:
    disk, driver = make(memory, image)
    line = RecordingInterruptLine()
    disk.set_interrupt_signal(LinePulseSignal(line))
    (ring,) = driver.init()
    assert disk.negotiated(VIRTIO_F_EVENT_IDX)
    edges = []
    ring.set_used_event(2)  # interrupt me when the third request completes
    for sector in range(4):
        run(driver, ring, submit(ring, VIRTIO_BLK_T_IN, sector, in_length=512))
        edges.append(line.changes.count(True))
    assert edges == [1, 1, 2, 2]
    traces = disk.traces()
    assert [trace.interrupt_ns is not None for trace in traces] == [True, False, True, False]
    disk.close()


def test_request_traces_have_ordered_timestamps_and_are_bounded(memory: GuestMemory, image: Path) -> None:
    disk, driver = make(memory, image, trace_limit=3)
    (ring,) = driver.init(accept=~(1 << VIRTIO_F_EVENT_IDX))
    for sector in range(5):
        run(driver, ring, submit(ring, VIRTIO_BLK_T_IN, sector, in_length=512))
    run(driver, ring, submit(ring, VIRTIO_BLK_T_FLUSH))
    traces = disk.drain_traces()
    assert len(traces) == 3 and disk.traces() == []
    assert [trace.type_name for trace in traces] == ["read", "read", "flush"]
    assert [trace.sector for trace in traces[:2]] == [3, 4]
    for trace in traces:
        assert isinstance(trace, RequestTrace)
        assert trace.device == "virtio-blk0" and trace.queue == 0
        assert trace.thread == threading.current_thread().name
        assert trace.notify_ns <= trace.pickup_ns <= trace.backend_start_ns <= trace.backend_end_ns
        assert trace.backend_end_ns <= trace.complete_ns
        assert trace.interrupt_ns is not None and trace.complete_ns <= trace.interrupt_ns
        assert trace.total_ns >= trace.backend_ns >= 0 and trace.queue_wait_ns >= 0
    assert traces[0].length == 512 and traces[0].status == VIRTIO_BLK_S_OK
    disk.close()


def test_close_releases_the_image(memory: GuestMemory, image: Path) -> None:
    disk, driver = make(memory, image)
    (ring,) = driver.init()
    disk.close()
    request = submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
    driver.notify(0)
    assert ring.take_used() == [] and request.status == 0xFF
