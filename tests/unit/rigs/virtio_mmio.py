"""A register-level virtio-mmio driver and a device that records what it serves.

``MmioDriver`` performs the driver side of virtio 1.2 section 3.1.1 on a VirtioMmioTransport.
"""

from __future__ import annotations

import struct

from tests.unit.rigs.virtqueue import Arena, Ring
from vmscope.memory.guest_memory import GuestMemory
from vmscope.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioDevice,
)
from vmscope.virtio.mmio import (
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_INTERRUPT_ACK,
    REG_INTERRUPT_STATUS,
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
    REG_STATUS,
    VirtioMmioTransport,
)
from vmscope.virtio.queue import Virtqueue

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
