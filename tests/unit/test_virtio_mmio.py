"""The virtio-mmio v2 transport driven through its registers, the way Linux's virtio_mmio does.

``MmioDriver`` (tests/unit/rigs/virtio_mmio.py, shared by the virtio test modules) performs the
driver side of the initialisation sequence of virtio 1.2 section 3.1.1 on a ``VirtioMmioTransport``.
"""

from __future__ import annotations

import logging

import pytest

from tests.unit.rigs.virtio_mmio import MmioDriver, RecordingDevice
from tests.unit.rigs.virtqueue import Arena
from vmscope.devices.base import RecordingInterruptLine
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import (
    INTERRUPT_CONFIG_CHANGE,
    INTERRUPT_USED_BUFFER,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    LineLevelSignal,
    LinePulseSignal,
)
from vmscope.virtio.mmio import (
    MAGIC_VALUE,
    REG_CONFIG_GENERATION,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DEVICE_ID,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_MAGIC_VALUE,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_NUM,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_READY,
    REG_QUEUE_SEL,
    REG_SHM_LEN_HIGH,
    REG_SHM_LEN_LOW,
    REG_STATUS,
    REG_VENDOR_ID,
    REG_VERSION,
    VENDOR_ID,
    VirtioMmioTransport,
)
from vmscope.virtio.rng import VirtioRng


@pytest.fixture
def device(memory: GuestMemory) -> RecordingDevice:
    return RecordingDevice(memory)


@pytest.fixture
def driver(device: RecordingDevice, memory: GuestMemory, arena: Arena) -> MmioDriver:
    return MmioDriver(VirtioMmioTransport(device), memory, arena)


# -- identification ------------------------------------------------------------------------------


def test_identification_registers(driver: MmioDriver) -> None:
    assert driver.read32(REG_MAGIC_VALUE) == MAGIC_VALUE == int.from_bytes(b"virt", "little")
    assert driver.read32(REG_VERSION) == 2
    assert driver.read32(REG_DEVICE_ID) == 42
    assert driver.read32(REG_VENDOR_ID) == VENDOR_ID
    driver.write32(REG_QUEUE_SEL, 0)
    assert driver.read32(REG_QUEUE_NUM_MAX) == 8
    driver.write32(REG_QUEUE_SEL, 1)
    assert driver.read32(REG_QUEUE_NUM_MAX) == 4
    driver.write32(REG_QUEUE_SEL, 2)
    assert driver.read32(REG_QUEUE_NUM_MAX) == 0  # no such queue
    assert driver.read32(REG_SHM_LEN_LOW) == driver.read32(REG_SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_registers_need_aligned_32_bit_access(driver: MmioDriver) -> None:
    assert driver.transport.read(REG_MAGIC_VALUE, 2) == b"\0\0"
    assert driver.transport.read(REG_MAGIC_VALUE + 1, 4) == bytes(4)
    driver.transport.write(REG_STATUS, b"\x01")
    assert driver.read32(REG_STATUS) == 0
    assert driver.transport.bad_accesses == 3


def test_config_space_reads_writes_and_generation(driver: MmioDriver, device: RecordingDevice) -> None:
    assert driver.config(0, 1) == 0x11
    assert driver.config(2, 2) == 0x4433
    assert driver.config(4, 4) == 0x88776655
    assert driver.config(0, 8) == 0x8877665544332211
    assert driver.config(6, 4) == 0x8877  # past the end reads as zero
    driver.transport.write(0x101, b"\xaa\xbb")
    assert device.config[1:3] == b"\xaa\xbb"
    generation = driver.read32(REG_CONFIG_GENERATION)
    device.config_changed()
    assert driver.read32(REG_CONFIG_GENERATION) == generation + 1


# -- feature negotiation and status ----------------------------------------------------------------


def test_offered_features_include_the_common_ones(driver: MmioDriver) -> None:
    offered = driver.device_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, 3):
        assert offered >> bit & 1
    driver.write32(REG_DEVICE_FEATURES_SEL, 5)
    assert driver.read32(REG_DEVICE_FEATURES) == 0


def test_features_ok_accepted_for_an_offered_subset(driver: MmioDriver, device: RecordingDevice) -> None:
    status = driver.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 3)
    assert status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    assert device.negotiated(3) and not device.negotiated(VIRTIO_F_EVENT_IDX)


def test_features_ok_refused_for_unoffered_features(
    driver: MmioDriver, caplog: pytest.LogCaptureFixture
) -> None:
    driver.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    driver.write_features(driver.device_features() | 1 << 7)
    with caplog.at_level(logging.WARNING, "vmscope.virtio"):
        driver.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not driver.read32(REG_STATUS) & STATUS_FEATURES_OK
    assert "did not offer (bits 7)" in caplog.text and "test-dev0" in caplog.text


def test_features_ok_refused_without_version_1(driver: MmioDriver) -> None:
    status = driver.negotiate(~(1 << VIRTIO_F_VERSION_1))
    assert not status & STATUS_FEATURES_OK


def test_features_beyond_bit_63_are_refused(driver: MmioDriver) -> None:
    driver.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    driver.write_features(1 << VIRTIO_F_VERSION_1)
    driver.write32(REG_DRIVER_FEATURES_SEL, 2)
    driver.write32(REG_DRIVER_FEATURES, 1)
    driver.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not driver.read32(REG_STATUS) & STATUS_FEATURES_OK


def test_driver_ok_refused_before_features_ok(driver: MmioDriver, device: RecordingDevice) -> None:
    driver.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert driver.read32(REG_STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert not device.operational


def test_features_cannot_change_after_features_ok(driver: MmioDriver, device: RecordingDevice) -> None:
    driver.negotiate(1 << VIRTIO_F_VERSION_1)
    driver.write_features(driver.device_features())
    assert device.driver_features == 1 << VIRTIO_F_VERSION_1


def test_status_bits_are_not_cleared_without_reset(driver: MmioDriver) -> None:
    driver.negotiate()
    driver.write32(REG_STATUS, STATUS_ACKNOWLEDGE)
    assert driver.read32(REG_STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK


def test_driver_cannot_set_needs_reset(driver: MmioDriver) -> None:
    driver.negotiate()
    driver.write32(REG_STATUS, driver.read32(REG_STATUS) | STATUS_NEEDS_RESET)
    assert not driver.read32(REG_STATUS) & STATUS_NEEDS_RESET


# -- queues, notifications, interrupts -----------------------------------------------------------


def test_queue_setup_through_registers(driver: MmioDriver, device: RecordingDevice) -> None:
    driver.negotiate()
    ring = driver.setup_queue(0, 8)
    queue = device.queues[0]
    assert (queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr) == (
        8,
        ring.desc,
        ring.avail,
        ring.used,
    )
    assert driver.read32(REG_QUEUE_READY) == 1
    driver.write32(REG_QUEUE_NUM, 4)  # ignored while ready
    assert queue.size == 8
    driver.write32(REG_QUEUE_READY, 0)
    assert driver.read32(REG_QUEUE_READY) == 0


def test_high_address_halves_are_kept(driver: MmioDriver, device: RecordingDevice) -> None:
    driver.write32(REG_QUEUE_SEL, 0)
    driver.write32(REG_QUEUE_DESC_HIGH, 0x1)
    driver.write32(REG_QUEUE_DESC_LOW, 0x2000)
    assert device.queues[0].desc_addr == 0x1_0000_2000
    driver.write32(REG_QUEUE_DESC_HIGH, 0)
    assert device.queues[0].desc_addr == 0x2000


def test_notify_serves_queue_and_raises_used_interrupt(
    driver: MmioDriver, device: RecordingDevice, arena: Arena
) -> None:
    line = RecordingInterruptLine()
    device.set_interrupt_signal(LineLevelSignal(line))
    rings = driver.init()
    head = rings[1].add_chain([(arena.alloc(8), 8, True)])
    driver.notify(1)
    assert device.served == [(1, head)]
    assert rings[1].take_used() == [(head, 0)]
    assert line.level
    assert driver.ack() == INTERRUPT_USED_BUFFER
    assert not line.level and driver.interrupt_status() == 0
    assert line.changes == [True, False]


def test_notification_before_driver_ok_is_ignored(
    driver: MmioDriver, device: RecordingDevice, arena: Arena
) -> None:
    driver.negotiate()
    ring = driver.setup_queue(0)
    ring.add_chain([(arena.alloc(8), 8, True)])
    driver.notify(0)
    driver.notify(7)  # no such queue
    assert device.served == []
    assert device.stats.ignored_notifications == 2
    driver.driver_ok()
    driver.notify(0)
    assert len(device.served) == 1


def test_pulse_signal_gives_one_edge_per_interrupt(
    driver: MmioDriver, device: RecordingDevice, arena: Arena
) -> None:
    line = RecordingInterruptLine()
    device.set_interrupt_signal(LinePulseSignal(line))
    rings = driver.init(accept=~(1 << VIRTIO_F_EVENT_IDX))
    for _ in range(2):
        rings[0].add_chain([(arena.alloc(8), 8, True)])
        driver.notify(0)
    assert line.changes == [True, False, True, False]
    assert driver.interrupt_status() == INTERRUPT_USED_BUFFER


def test_config_change_interrupt_only_after_driver_ok(driver: MmioDriver, device: RecordingDevice) -> None:
    device.config_changed()
    assert driver.interrupt_status() == 0
    driver.init()
    device.config_changed()
    assert driver.interrupt_status() == INTERRUPT_CONFIG_CHANGE


def test_reset_clears_status_queues_and_interrupts(
    driver: MmioDriver, device: RecordingDevice, arena: Arena
) -> None:
    line = RecordingInterruptLine()
    device.set_interrupt_signal(LineLevelSignal(line))
    rings = driver.init()
    rings[0].add_chain([(arena.alloc(8), 8, True)])
    driver.notify(0)
    assert line.level
    driver.write32(REG_STATUS, 0)
    assert driver.read32(REG_STATUS) == 0
    assert driver.interrupt_status() == 0 and not line.level
    for index in (0, 1):
        driver.write32(REG_QUEUE_SEL, index)
        assert driver.read32(REG_QUEUE_READY) == 0
    assert device.driver_features == 0
    # and it comes back: a fresh initialisation works
    rings = driver.init()
    head = rings[0].add_chain([(arena.alloc(8), 8, True)])
    driver.notify(0)
    assert rings[0].take_used() == [(head, 0)]


def test_invalid_queue_size_puts_device_in_needs_reset(
    driver: MmioDriver, device: RecordingDevice, caplog: pytest.LogCaptureFixture
) -> None:
    driver.negotiate()
    driver.write32(REG_QUEUE_SEL, 0)
    driver.write32(REG_QUEUE_NUM, 6)
    with caplog.at_level(logging.ERROR, "vmscope.virtio"):
        driver.write32(REG_QUEUE_READY, 1)
    assert driver.read32(REG_QUEUE_READY) == 0
    assert driver.read32(REG_STATUS) & STATUS_NEEDS_RESET
    assert "test-dev0" in caplog.text and "not a power of two" in caplog.text


def test_other_devices_keep_running_when_one_needs_reset(memory: GuestMemory, arena: Arena) -> None:
    broken = MmioDriver(VirtioMmioTransport(RecordingDevice(memory)), memory, arena)
    rng = VirtioRng(memory)
    healthy = MmioDriver(VirtioMmioTransport(rng), memory, arena)
    bad_rings = broken.init()
    good_rings = healthy.init()
    bad_rings[0].write_desc(0, 0xE000_0000, 64, 0)
    bad_rings[0].publish(0)
    broken.notify(0)
    assert broken.read32(REG_STATUS) & STATUS_NEEDS_RESET
    buffer = arena.alloc(32)
    head = good_rings[0].add_chain([(buffer, 32, True)])
    healthy.notify(0)
    assert good_rings[0].take_used() == [(head, 32)]
    assert not healthy.read32(REG_STATUS) & STATUS_NEEDS_RESET
