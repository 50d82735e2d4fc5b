"""The virtio-mmio v2 transport driven through its registers, the way Linux's virtio_mmio does.

``MmioDriver`` (used by the other virtio test modules) performs the driver side of the
initialisation sequence of virtio 1.2 section 3.1.1 on a ``VirtioMmioTransport``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

import pytest

from tests.unit.test_virtio_queue import RAM_SIZE, Arena, Ring
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
    VirtioDevice,
)
from vmscope.virtio.mmio import (
    MAGIC_VALUE,
    REG_CONFIG_GENERATION,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DEVICE_ID,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_INTERRUPT_ACK,
    REG_INTERRUPT_STATUS,
    REG_MAGIC_VALUE,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NOTIFY,
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
from vmscope.virtio.queue import Virtqueue
from vmscope.virtio.rng import VirtioRng

ALL = -1


class MmioDriver:
    """Register-level driver for one virtio-mmio device."""

    def __init__(self, transport: VirtioMmioTransport, memory: GuestMemory, arena: Arena) -> None:
        self.transport = transport
        self.memory = memory
        self.arena = arena
        self.rings: dict[int, Ring] = {}

    def read32(self, offset: int) -> int:
        return int(struct.unpack("<I", self.transport.read(offset, 4))[0])

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, struct.pack("<I", value & 0xFFFF_FFFF))

    def config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.transport.read(0x100 + offset, size), "little")

    def device_features(self) -> int:
        features = 0
        for word in (1, 0):
            self.write32(REG_DEVICE_FEATURES_SEL, word)
            features |= self.read32(REG_DEVICE_FEATURES) << (32 * word)
        return features

    def write_features(self, features: int) -> None:
        for word in (1, 0):
            self.write32(REG_DRIVER_FEATURES_SEL, word)
            self.write32(REG_DRIVER_FEATURES, features >> (32 * word))

    def negotiate(self, accept: int = ALL) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; the status read back."""
        self.write32(REG_STATUS, 0)
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE)
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        self.write_features(offered & accept if accept != ALL else offered)
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return self.read32(REG_STATUS)

    def setup_queue(self, index: int, size: int | None = None) -> Ring:
        self.write32(REG_QUEUE_SEL, index)
        assert self.read32(REG_QUEUE_READY) == 0
        maximum = self.read32(REG_QUEUE_NUM_MAX)
        assert maximum > 0
        ring = Ring(self.memory, self.arena, size or min(maximum, 16))
        self.write32(REG_QUEUE_NUM, ring.size)
        for low, high, address in (
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, ring.desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, ring.avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, ring.used),
        ):
            self.write32(low, address)
            self.write32(high, address >> 32)
        self.write32(REG_QUEUE_READY, 1)
        self.rings[index] = ring
        return ring

    def driver_ok(self) -> int:
        self.write32(REG_STATUS, self.read32(REG_STATUS) | STATUS_DRIVER_OK)
        return self.read32(REG_STATUS)

    def init(self, accept: int = ALL, queue_size: int | None = None) -> list[Ring]:
        """The whole sequence up to DRIVER_OK, with every queue the device has."""
        status = self.negotiate(accept)
        assert status & STATUS_FEATURES_OK, "device refused the features"
        rings = []
        index = 0
        while True:
            self.write32(REG_QUEUE_SEL, index)
            if self.read32(REG_QUEUE_NUM_MAX) == 0:
                break
            rings.append(self.setup_queue(index, queue_size))
            index += 1
        assert self.driver_ok() & STATUS_DRIVER_OK
        return rings

    def notify(self, index: int) -> None:
        self.write32(REG_QUEUE_NOTIFY, index)

    def interrupt_status(self) -> int:
        return self.read32(REG_INTERRUPT_STATUS)

    def ack(self) -> int:
        """What an interrupt handler does: read InterruptStatus and acknowledge it."""
        status = self.read32(REG_INTERRUPT_STATUS)
        self.write32(REG_INTERRUPT_ACK, status)
        return status


class RecordingDevice(VirtioDevice):
    """A device that records what it sees and completes every chain with 0 bytes."""

    device_id = 42

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory, (8, 4), name="test-dev0", features=1 << 3)
        self.config = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")
        self.served: list[tuple[int, int]] = []

    def config_space(self) -> bytes:
        return bytes(self.config)

    def config_write(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def process_queue(self, queue: Virtqueue, notified_ns: int) -> None:
        while (chain := queue.pop()) is not None:
            self.served.append((queue.index, chain.head))
            queue.push_used(chain.head, 0)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.for_size(RAM_SIZE)
    yield ram
    ram.close()


@pytest.fixture
def arena(memory: GuestMemory) -> Arena:
    return Arena(memory)


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
