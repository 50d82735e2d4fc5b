"""PCI test rigs: configuration access through ports 0xCF8/0xCFC, a virtio-pci driver, a bus rig.

Also fakes of the KVM calls (routing, irqfds, ioeventfds) a PCI attachment makes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from tests.unit.rigs.virtio_mmio import ALL
from tests.unit.rigs.virtqueue import Arena, Ring
from vmscope.bus import MmioBus, PioBus
from vmscope.devices.base import Device, RecordingInterruptLine
from vmscope.errors import KvmError
from vmscope.firmware import FirmwareContributions
from vmscope.kvm import structs as s
from vmscope.memory.guest_memory import GuestMemory
from vmscope.pci.bus import CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, PCI_MMIO_WINDOW_BASE, PciBus
from vmscope.pci.device import (
    CAP_ID_MSIX,
    CAP_ID_VENDOR,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    PCI_BASE_ADDRESS_0,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_STATUS,
    STATUS_CAP_LIST,
)
from vmscope.pci.msix import (
    CONTROL_ENABLE,
    KVM_IRQ_ROUTING_IRQCHIP,
    RecordingMsiSink,
)
from vmscope.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    LineLevelSignal,
    VirtioDevice,
)
from vmscope.virtio.pci import (
    CAP_COMMON_CFG,
    CAP_ISR_CFG,
    CAP_NOTIFY_CFG,
    COMMON_DEVICE_FEATURE,
    COMMON_DEVICE_FEATURE_SELECT,
    COMMON_DEVICE_STATUS,
    COMMON_DRIVER_FEATURE,
    COMMON_DRIVER_FEATURE_SELECT,
    COMMON_NUM_QUEUES,
    COMMON_QUEUE_DESC,
    COMMON_QUEUE_DEVICE,
    COMMON_QUEUE_DRIVER,
    COMMON_QUEUE_ENABLE,
    COMMON_QUEUE_MSIX_VECTOR,
    COMMON_QUEUE_NOTIFY_OFF,
    COMMON_QUEUE_SELECT,
    COMMON_QUEUE_SIZE,
    VIRTIO_MSI_NO_VECTOR,
    VirtioPciTransport,
)
from vmscope.virtio.pci_attach import (
    PciPlatform,
)


def conf1_address(bus: int, slot: int, function: int, offset: int) -> int:
    return 0x8000_0000 | bus << 16 | slot << 11 | function << 8 | (offset & 0xFC)


class PortDriver:
    """Configuration accesses through the I/O ports, with any width at any byte offset."""

    def __init__(self, ports: PioBus) -> None:
        self.ports = ports

    def read(self, slot: int, offset: int, size: int = 4, *, function: int = 0, bus: int = 0) -> int:
        self.ports.write(CONFIG_ADDRESS_PORT, struct.pack("<I", conf1_address(bus, slot, function, offset)))
        return int.from_bytes(self.ports.read(0xCFC + (offset & 3), size), "little")

    def write(self, slot: int, offset: int, value: int, size: int = 4, *, function: int = 0) -> None:
        self.ports.write(CONFIG_ADDRESS_PORT, struct.pack("<I", conf1_address(0, slot, function, offset)))
        self.ports.write(0xCFC + (offset & 3), (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    def capabilities(self, slot: int) -> list[tuple[int, int]]:
        """(capability id, offset) walking the list from 0x34 like pci_find_capability (48 hops at most)."""
        found = []
        if not self.read(slot, PCI_STATUS, 2) & STATUS_CAP_LIST:
            return found
        position = self.read(slot, PCI_CAPABILITY_LIST, 1)
        for _ in range(48):
            if position < 0x40:
                break
            position &= ~3
            cap_id = self.read(slot, position, 1)
            if cap_id == 0xFF:
                break
            found.append((cap_id, position))
            position = self.read(slot, position + 1, 1)
        return found

    def size_bar(self, slot: int, index: int) -> tuple[int, int]:
        """Linux's __pci_read_base for one 32-bit BAR register: (value written back, all-ones readback)."""
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        original = self.read(slot, offset)
        self.write(slot, offset, 0xFFFF_FFFF)
        sized = self.read(slot, offset)
        self.write(slot, offset, original)
        return original, sized


@dataclass
class FakeRoutingVm:
    tables: list[list[tuple[int, int, tuple[int, ...]]]] = field(default_factory=list)
    irqfds: dict[int, int] = field(default_factory=dict)  # fd -> gsi
    msis: list[tuple[int, int]] = field(default_factory=list)

    def set_gsi_routing(self, entries: list[s.kvm_irq_routing_entry]) -> None:
        table = []
        for entry in entries:
            if entry.type == KVM_IRQ_ROUTING_IRQCHIP:
                payload: tuple[int, ...] = (entry.u.irqchip.irqchip, entry.u.irqchip.pin)
            else:
                payload = (entry.u.msi.address_lo, entry.u.msi.address_hi, entry.u.msi.data)
            table.append((int(entry.gsi), int(entry.type), payload))
        self.tables.append(table)

    def register_irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None) -> None:
        assert resample_fd is None  # MSI irqfds are edge: no resampling
        self.irqfds[event_fd] = gsi

    def unregister_irqfd(self, event_fd: int, gsi: int) -> None:
        assert self.irqfds.pop(event_fd) == gsi

    def signal_msi(self, address: int, data: int) -> int:
        self.msis.append((address, data))
        return 1


BAR_ADDRESS = PCI_MMIO_WINDOW_BASE + 0x10000


MSI_ADDRESS = 0xFEE0_0000


@dataclass
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    position: int
    multiplier: int = 0


class PciVirtioDriver:
    """Register-level driver for one virtio-pci function (the virtio 1.2 section 3.1.1 sequence)."""

    def __init__(
        self, ports: PortDriver, mmio: MmioBus, slot: int, memory: GuestMemory, arena: Arena
    ) -> None:
        self.ports = ports
        self.mmio = mmio
        self.slot = slot
        self.memory = memory
        self.arena = arena
        self.caps: dict[int, VirtioCap] = {}
        self.msix_cap = 0
        for cap_id, position in ports.capabilities(slot):
            if cap_id == CAP_ID_MSIX:
                self.msix_cap = position
            if cap_id != CAP_ID_VENDOR:
                continue
            cap = VirtioCap(
                cfg_type=ports.read(slot, position + 3, 1),
                bar=ports.read(slot, position + 4, 1),
                offset=ports.read(slot, position + 8),
                length=ports.read(slot, position + 12),
                position=position,
            )
            if cap.cfg_type == CAP_NOTIFY_CFG:
                cap.multiplier = ports.read(slot, position + 16)
            self.caps.setdefault(cap.cfg_type, cap)
        self.rings: dict[int, Ring] = {}

    def bar0(self) -> int:
        return self.ports.read(self.slot, PCI_BASE_ADDRESS_0) & ~0xF | self.ports.read(self.slot, 0x14) << 32

    def enable(self) -> None:
        self.ports.write(self.slot, PCI_COMMAND, COMMAND_MEMORY | COMMAND_MASTER, 2)

    def address(self, cfg_type: int, offset: int = 0) -> int:
        cap = self.caps[cfg_type]
        assert cap.bar == 0
        return self.bar0() + cap.offset + offset

    def common_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.mmio.read(self.address(CAP_COMMON_CFG, offset), size), "little")

    def common_write(self, offset: int, value: int, size: int) -> None:
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        self.mmio.write(self.address(CAP_COMMON_CFG, offset), data)

    def write64(self, offset: int, value: int) -> None:
        """How Linux writes queue addresses: two 32-bit halves, low first."""
        self.common_write(offset, value, 4)
        self.common_write(offset + 4, value >> 32, 4)

    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.common_write(COMMON_DEVICE_FEATURE_SELECT, word, 4)
            features |= self.common_read(COMMON_DEVICE_FEATURE, 4) << (32 * word)
        return features

    def status(self) -> int:
        return self.common_read(COMMON_DEVICE_STATUS, 1)

    def negotiate(self, accept: int = ALL) -> int:
        self.common_write(COMMON_DEVICE_STATUS, 0, 1)
        assert self.status() == 0
        self.common_write(COMMON_DEVICE_STATUS, STATUS_ACKNOWLEDGE, 1)
        self.common_write(COMMON_DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER, 1)
        offered = self.device_features()
        wanted = offered if accept == ALL else offered & accept
        for word in (0, 1):
            self.common_write(COMMON_DRIVER_FEATURE_SELECT, word, 4)
            self.common_write(COMMON_DRIVER_FEATURE, wanted >> (32 * word), 4)
        self.common_write(COMMON_DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 1)
        return self.status()

    def setup_queue(self, index: int, *, size: int = 8, vector: int = VIRTIO_MSI_NO_VECTOR) -> Ring:
        self.common_write(COMMON_QUEUE_SELECT, index, 2)
        assert self.common_read(COMMON_QUEUE_ENABLE, 2) == 0
        size = min(size, self.common_read(COMMON_QUEUE_SIZE, 2))
        ring = Ring(self.memory, self.arena, size)
        self.common_write(COMMON_QUEUE_SIZE, size, 2)
        self.write64(COMMON_QUEUE_DESC, ring.desc)
        self.write64(COMMON_QUEUE_DRIVER, ring.avail)
        self.write64(COMMON_QUEUE_DEVICE, ring.used)
        self.common_write(COMMON_QUEUE_MSIX_VECTOR, vector, 2)
        assert self.common_read(COMMON_QUEUE_MSIX_VECTOR, 2) == vector
        self.common_write(COMMON_QUEUE_ENABLE, 1, 2)
        self.rings[index] = ring
        return ring

    def driver_ok(self) -> int:
        self.common_write(COMMON_DEVICE_STATUS, self.status() | STATUS_DRIVER_OK, 1)
        return self.status()

    def init(self, *, vectors: bool = False) -> list[Ring]:
        assert self.negotiate() & STATUS_FEATURES_OK
        count = self.common_read(COMMON_NUM_QUEUES, 2)
        rings = [self.setup_queue(i, vector=i + 1 if vectors else VIRTIO_MSI_NO_VECTOR) for i in range(count)]
        assert self.driver_ok() & STATUS_DRIVER_OK
        return rings

    def notify(self, index: int) -> None:
        self.common_write(COMMON_QUEUE_SELECT, index, 2)
        offset = self.common_read(COMMON_QUEUE_NOTIFY_OFF, 2) * self.caps[CAP_NOTIFY_CFG].multiplier
        self.mmio.write(self.address(CAP_NOTIFY_CFG, offset), struct.pack("<H", index))

    def isr(self) -> int:
        return self.mmio.read(self.address(CAP_ISR_CFG), 1)[0]

    def enable_msix(self, vectors: int) -> None:
        table_bir = self.ports.read(self.slot, self.msix_cap + 4)
        table = self.bar0() + (table_bir & ~7)
        for vector in range(vectors):
            entry = table + 16 * vector
            self.mmio.write(entry, struct.pack("<I", MSI_ADDRESS))
            self.mmio.write(entry + 4, struct.pack("<I", 0))
            self.mmio.write(entry + 8, struct.pack("<I", 0x40 + vector))
            self.mmio.write(entry + 12, struct.pack("<I", 0))
        self.ports.write(self.slot, self.msix_cap + 2, CONTROL_ENABLE, 2)


class Rig:
    """A PCI bus on a port bus and an MMIO bus, with one virtio function on it."""

    def __init__(
        self, device: VirtioDevice, memory: GuestMemory, *, sink: RecordingMsiSink | None = None
    ) -> None:
        self.line = RecordingInterruptLine()
        self.sink = sink or RecordingMsiSink()
        self.transport = VirtioPciTransport(
            device, bar_address=BAR_ADDRESS, msi_sink=self.sink, intx=LineLevelSignal(self.line)
        )
        self.pci = PciBus()
        self.ports = PioBus()
        self.ports.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, self.pci)
        self.mmio = MmioBus()
        self.mmio.register(self.pci.window_base, self.pci.window_size, self.pci.mmio_window)
        self.slot = self.pci.add(self.transport)
        self.port_driver = PortDriver(self.ports)
        self.driver = PciVirtioDriver(self.port_driver, self.mmio, self.slot, memory, Arena(memory))


@dataclass
class FakeKvmVm(FakeRoutingVm):
    ioeventfds: dict[tuple[int, int | None], tuple[int, int]] = field(
        default_factory=dict
    )  # (addr, dm)->(fd, len)
    intx_irqfds: dict[int, tuple[int, int]] = field(default_factory=dict)  # fd -> (gsi, resample fd)
    refuse_any_length: bool = False
    refuse_all: bool = False

    def register_ioeventfd(
        self,
        event_fd: int,
        address: int,
        length: int,
        *,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        assert not pio
        if not deassign and (self.refuse_all or (length == 0 and self.refuse_any_length)):
            raise KvmError("KVM_IOEVENTFD failed: EINVAL (Invalid argument)")
        key = (address, datamatch)
        if deassign:
            assert self.ioeventfds.pop(key) == (event_fd, length)
        else:
            assert key not in self.ioeventfds
            self.ioeventfds[key] = (event_fd, length)

    def register_irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None) -> None:
        if resample_fd is None:
            super().register_irqfd(event_fd, gsi)
        else:
            self.intx_irqfds[event_fd] = (gsi, resample_fd)

    def unregister_irqfd(self, event_fd: int, gsi: int) -> None:
        if event_fd in self.intx_irqfds:
            assert self.intx_irqfds.pop(event_fd)[0] == gsi
        else:
            super().unregister_irqfd(event_fd, gsi)

    def guest_write(self, address: int, data: bytes) -> bool:
        """KVM's part of a guest MMIO write: signal a matching ioeventfd (True) or exit (False)."""
        for (where, datamatch), (fd, length) in self.ioeventfds.items():
            if where != address:
                continue
            if length == 0 or (len(data) == length and int.from_bytes(data, "little") == datamatch):
                os.eventfd_write(fd, 1)
                return True
        return False


class FakePciMachine:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.vm = FakeKvmVm()
        self.pio_bus = PioBus()
        self.mmio_bus = MmioBus()
        self.lines: dict[int, RecordingInterruptLine] = {}
        self.pci_platform: PciPlatform | None = None
        self.firmware = FirmwareContributions()

    def interrupt_line(self, gsi: int) -> RecordingInterruptLine:
        return self.lines.setdefault(gsi, RecordingInterruptLine())

    def add_pio_device(self, base: int, length: int, device: Device) -> None:
        self.pio_bus.register(base, length, device)

    def add_mmio_device(self, base: int, length: int, device: Device) -> None:
        self.mmio_bus.register(base, length, device)

    def guest_mmio_write(self, address: int, data: bytes) -> None:
        if not self.vm.guest_write(address, data):
            self.mmio_bus.write(address, data)
