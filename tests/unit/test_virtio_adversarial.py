"""Hostile descriptor tables: the device goes to NEEDS_RESET, logs why, and never raises."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.rigs.virtio_block import IMAGE, submit
from tests.unit.rigs.virtio_mmio import MmioDriver
from tests.unit.rigs.virtqueue import OUTSIDE_RAM, RAM_SIZE, Arena, Ring
from vmscope.bus import MmioBus
from vmscope.devices.base import RecordingInterruptLine
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlock
from vmscope.virtio.device import (
    INTERRUPT_CONFIG_CHANGE,
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_INDIRECT_DESC,
    LineLevelSignal,
)
from vmscope.virtio.mmio import REG_QUEUE_NOTIFY, REG_STATUS, VirtioMmioTransport
from vmscope.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

HEADER_IN = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)


def loop(ring: Ring, arena: Arena) -> None:
    header = arena.put(HEADER_IN)
    ring.write_desc(0, header, 16, VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, arena.alloc(512), 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    ring.write_desc(2, arena.alloc(1), 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    ring.publish(0)


def self_loop(ring: Ring, arena: Arena) -> None:
    ring.write_desc(0, arena.put(HEADER_IN), 16, VIRTQ_DESC_F_NEXT, 0)
    ring.publish(0)


def next_out_of_range(ring: Ring, arena: Arena) -> None:
    ring.write_desc(0, arena.put(HEADER_IN), 16, VIRTQ_DESC_F_NEXT, 0xFFFF)
    ring.publish(0)


def data_outside_ram(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.put(HEADER_IN), 16, False), (OUTSIDE_RAM, 512, True), (arena.alloc(1), 1, True)])


def status_past_end_of_ram(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.put(HEADER_IN), 16, False), (RAM_SIZE - 1, 2, True)])


def huge_length(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.put(HEADER_IN), 16, False), (arena.alloc(512), 0xFFFF_FFFF, True)])


def zero_length_header(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.put(HEADER_IN), 0, False), (arena.alloc(1), 1, True)])


def zero_length_status(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.put(HEADER_IN), 16, False), (arena.alloc(1), 0, True)])


def header_in_writable_buffer(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.put(HEADER_IN), 16, True), (arena.alloc(1), 1, True)])


def header_after_status(ring: Ring, arena: Arena) -> None:
    ring.add_chain([(arena.alloc(1), 1, True), (arena.put(HEADER_IN), 16, False)])


def nested_indirect(ring: Ring, arena: Arena) -> None:
    inner = arena.alloc(16)
    ring.write_desc(0, arena.put(HEADER_IN), 16, 0, table=inner)
    outer = arena.alloc(16)
    ring.write_desc(0, inner, 16, VIRTQ_DESC_F_INDIRECT, table=outer)
    ring.write_desc(0, outer, 16, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)


def indirect_table_outside_ram(ring: Ring, arena: Arena) -> None:
    ring.write_desc(0, OUTSIDE_RAM, 64, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)


def avail_idx_far_ahead(ring: Ring, arena: Arena) -> None:
    ring.memory.write_u16(ring.avail + 2, 0x8000)


def head_out_of_range(ring: Ring, arena: Arena) -> None:
    ring.publish(ring.size + 3)


CASES: dict[str, tuple[Callable[[Ring, Arena], None], str]] = {
    "loop": (loop, "a loop"),
    "self-loop": (self_loop, "a loop"),
    "next-out-of-range": (next_out_of_range, "next index 65535"),
    "data-outside-ram": (data_outside_ram, "outside guest RAM"),
    "status-past-end-of-ram": (status_past_end_of_ram, "outside guest RAM"),
    "huge-length": (huge_length, "outside guest RAM"),
    "zero-length-header": (zero_length_header, "0 device-readable bytes"),
    "zero-length-status": (zero_length_status, "no device-writable byte"),
    "wrong-flags": (header_in_writable_buffer, "device-readable bytes"),
    "readable-after-writable": (header_after_status, "readable descriptor after"),
    "nested-indirect": (nested_indirect, "inside an indirect table"),
    "indirect-outside-ram": (indirect_table_outside_ram, "outside guest RAM"),
    "avail-idx-ahead": (avail_idx_far_ahead, "more than the queue size"),
    "head-out-of-range": (head_out_of_range, "head index"),
}


@pytest.fixture
def setup(memory: GuestMemory, tmp_path: Path) -> Iterator[tuple[VirtioBlock, MmioDriver, MmioBus]]:
    image = tmp_path / "disk.img"
    image.write_bytes(IMAGE)
    disk = VirtioBlock(memory, image)
    transport = VirtioMmioTransport(disk)
    bus = MmioBus()
    bus.register(0xFEB0_0000, 0x200, transport)
    yield disk, MmioDriver(transport, memory, Arena(memory)), bus
    disk.close()


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_chain_sets_needs_reset_and_recovers_after_reset(
    setup: tuple[VirtioBlock, MmioDriver, MmioBus], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    disk, driver, bus = setup
    build, reason = CASES[case]
    line = RecordingInterruptLine()
    disk.set_interrupt_signal(LineLevelSignal(line))
    (ring,) = driver.init(queue_size=8)
    assert disk.negotiated(VIRTIO_F_INDIRECT_DESC)
    build(ring, driver.arena)

    with caplog.at_level(logging.ERROR, "vmscope.virtio"):
        bus.write(0xFEB0_0000 + REG_QUEUE_NOTIFY, struct.pack("<I", 0))  # the guest's notify, through the bus

    assert bus.device_errors == {}  # nothing escaped to the bus
    status = driver.read32(REG_STATUS)
    assert status & STATUS_NEEDS_RESET and status & STATUS_DRIVER_OK
    assert driver.interrupt_status() & INTERRUPT_CONFIG_CHANGE and line.level
    assert "virtio-blk0" in caplog.text and reason in caplog.text
    assert disk.last_error is not None and reason in disk.last_error

    # further notifications are ignored until the driver resets the device
    notifications = disk.stats.ignored_notifications
    driver.notify(0)
    assert disk.stats.ignored_notifications == notifications + 1

    # reset and initialise again: the device works
    driver.write32(REG_STATUS, 0)
    assert driver.read32(REG_STATUS) == 0 and not line.level
    (ring,) = driver.init(queue_size=8)
    request = submit(ring, VIRTIO_BLK_T_IN, 1, in_length=512)
    driver.notify(0)
    assert [head for head, _ in ring.take_used()] == [request.head]
    assert request.status == VIRTIO_BLK_S_OK and request.data() == IMAGE[512:1024]


def test_requests_before_a_malformed_chain_are_served_first(
    setup: tuple[VirtioBlock, MmioDriver, MmioBus],
) -> None:
    """One notification, three good reads (two of them neighbours, sharing a syscall), then a
    head outside the descriptor table: the reads complete with their data, then the device
    needs a reset."""
    disk, driver, _ = setup
    (ring,) = driver.init(queue_size=16)
    good = [
        submit(ring, VIRTIO_BLK_T_IN, 2, in_length=512),
        submit(ring, VIRTIO_BLK_T_IN, 3, in_length=512),
        submit(ring, VIRTIO_BLK_T_IN, 7, in_length=1024),
    ]
    head_out_of_range(ring, driver.arena)
    driver.notify(0)
    assert ring.take_used() == [(good[0].head, 513), (good[1].head, 513), (good[2].head, 1025)]
    assert [request.status for request in good] == [VIRTIO_BLK_S_OK] * 3
    assert good[0].data() == IMAGE[1024:1536] and good[1].data() == IMAGE[1536:2048]
    assert good[2].data() == IMAGE[7 * 512 : 9 * 512]
    assert driver.read32(REG_STATUS) & STATUS_NEEDS_RESET
    assert disk.last_error is not None and "head index" in disk.last_error
    assert [trace.sector for trace in disk.traces()] == [2, 3, 7]


def test_device_model_bug_is_contained(
    setup: tuple[VirtioBlock, MmioDriver, MmioBus],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk, driver, _ = setup
    (ring,) = driver.init()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(disk, "_transfer", broken)  # where every read and write moves data
    submit(ring, VIRTIO_BLK_T_IN, 0, in_length=512)
    with caplog.at_level(logging.ERROR, "vmscope.virtio"):
        driver.notify(0)
    assert disk.needs_reset
    assert "internal error" in caplog.text and "simulated bug" in caplog.text


def test_ring_areas_outside_ram_at_queue_ready(setup: tuple[VirtioBlock, MmioDriver, MmioBus]) -> None:
    disk, driver, _ = setup
    driver.negotiate()
    driver.write32(0x030, 0)  # QueueSel
    driver.write32(0x080, OUTSIDE_RAM)  # QueueDescLow
    driver.write32(0x044, 1)  # QueueReady
    assert disk.needs_reset and not disk.queues[0].ready
