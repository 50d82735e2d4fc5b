"""MSI-X: the capability in configuration space, the table and PBA in a BAR, masking, and KVM delivery.

The table is driven through the BAR the way Linux's pci_msix_* code does (32-bit accesses to
address low/high, data and vector control); KVM is a fake that records routing tables and
irqfds, with real eventfds so a fired vector is observable as a readable descriptor.
"""

from __future__ import annotations

import os
import struct

import pytest

from tests.unit.rigs.pci import FakeRoutingVm, PortDriver
from vmscope.bus import PioBus
from vmscope.errors import ConfigError
from vmscope.pci.bus import CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, PciBus
from vmscope.pci.device import CAP_ID_MSIX, BarKind, PciDevice
from vmscope.pci.msix import (
    CONTROL_ENABLE,
    CONTROL_FUNCTION_MASK,
    FIRST_MSI_GSI,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    DirectMsiSink,
    GsiRouting,
    IrqfdMsiSink,
    MsixCapability,
    RecordingMsiSink,
    default_irqchip_routes,
)

TABLE, PBA = 0x2000, 0x3000
MSG_ADDRESS = 0xFEE0_0000
VECTORS = 5


class MsixFunction(PciDevice):
    def __init__(self, sink: RecordingMsiSink | IrqfdMsiSink | DirectMsiSink) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x11, class_code=0xFF0000)
        self.add_bar(2, 0x4000, BarKind.MEMORY32, address=0xE000_0000)
        self.msix = MsixCapability(self, VECTORS, bar=2, table_offset=TABLE, pba_offset=PBA, sink=sink)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return self.msix.read(offset, size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.msix.write(offset, data)


class TableDriver:
    """What a driver does with the table: 32-bit writes of address, data and vector control."""

    def __init__(self, function: MsixFunction, ports: PortDriver, slot: int) -> None:
        self.function = function
        self.ports = ports
        self.slot = slot
        self.cap = function.msix.offset

    def write32(self, offset: int, value: int) -> None:
        self.function.bar_write(2, offset, struct.pack("<I", value))

    def read32(self, offset: int) -> int:
        return int(struct.unpack("<I", self.function.bar_read(2, offset, 4))[0])

    def program(self, vector: int, apic_vector: int, *, unmask: bool = True) -> None:
        base = TABLE + 16 * vector
        self.write32(base, MSG_ADDRESS)
        self.write32(base + 4, 0)
        self.write32(base + 8, apic_vector)
        if unmask:
            self.write32(base + 12, 0)

    def mask(self, vector: int, masked: bool) -> None:
        self.write32(TABLE + 16 * vector + 12, int(masked))

    def control(self, value: int | None = None) -> int:
        if value is not None:
            self.ports.write(self.slot, self.cap + 2, value, 2)
        return self.ports.read(self.slot, self.cap + 2, 2)

    def pba(self) -> int:
        return self.read32(PBA) | self.read32(PBA + 4) << 32


@pytest.fixture
def sink() -> RecordingMsiSink:
    return RecordingMsiSink()


@pytest.fixture
def function(sink: RecordingMsiSink) -> MsixFunction:
    return MsixFunction(sink)


@pytest.fixture
def table(function: MsixFunction) -> TableDriver:
    pci = PciBus()
    ports = PioBus()
    ports.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, pci)
    slot = pci.add(function)
    return TableDriver(function, PortDriver(ports), slot)


def test_capability_layout(table: TableDriver) -> None:
    caps = table.ports.capabilities(table.slot)
    assert caps == [(CAP_ID_MSIX, table.cap)]
    assert table.control() == VECTORS - 1  # table size - 1, disabled, not masked
    assert table.ports.read(table.slot, table.cap + 4) == TABLE | 2  # offset | BIR
    assert table.ports.read(table.slot, table.cap + 8) == PBA | 2
    table.ports.write(table.slot, table.cap + 4, 0)  # table offset/BIR are read-only
    assert table.ports.read(table.slot, table.cap + 4) == TABLE | 2


def test_table_starts_masked_and_reads_back(table: TableDriver) -> None:
    for vector in range(VECTORS):
        assert table.read32(TABLE + 16 * vector + 12) == 1
    table.program(3, 0x41, unmask=False)
    assert [table.read32(TABLE + 48 + i) for i in (0, 4, 8, 12)] == [MSG_ADDRESS, 0, 0x41, 1]
    table.write32(TABLE + 48, MSG_ADDRESS | 0x3)  # address bits 1:0 are reserved
    table.write32(TABLE + 48 + 12, 0xFFFF_FFFE)  # vector control bits 31:1 are reserved
    assert table.read32(TABLE + 48) == MSG_ADDRESS
    assert table.read32(TABLE + 48 + 12) == 0
    qword = table.function.bar_read(2, TABLE + 48, 8)  # 64-bit reads work too
    assert struct.unpack("<Q", qword)[0] == MSG_ADDRESS
    assert table.read32(TABLE + 16 * VECTORS) == 0  # past the table


def test_fire_is_refused_while_msix_is_disabled(table: TableDriver, sink: RecordingMsiSink) -> None:
    table.program(0, 0x40)
    assert not table.function.msix.fire(0)
    assert sink.sent == [] and table.pba() == 0


def test_enabled_unmasked_vector_is_sent_with_its_message(table: TableDriver, sink: RecordingMsiSink) -> None:
    table.program(1, 0x45)
    table.control(CONTROL_ENABLE)
    assert table.function.msix.enabled
    assert table.function.msix.fire(1)
    assert sink.sent == [(1, MSG_ADDRESS, 0x45)]
    # the message changed: the sink hears the new one before the next send
    table.write32(TABLE + 16 + 8, 0x46)
    table.function.msix.fire(1)
    assert sink.programmed[1] == (MSG_ADDRESS, 0x46) and sink.sent[-1] == (1, MSG_ADDRESS, 0x46)


def test_masked_vector_sets_pba_and_fires_on_unmask(table: TableDriver, sink: RecordingMsiSink) -> None:
    table.program(2, 0x50, unmask=False)
    table.control(CONTROL_ENABLE)
    assert table.function.msix.fire(2)
    assert sink.sent == [] and table.pba() == 1 << 2
    table.function.msix.fire(2)  # still one pending message, not two
    table.mask(2, False)
    assert sink.sent == [(2, MSG_ADDRESS, 0x50)] and table.pba() == 0
    table.function.bar_write(2, PBA, b"\xff" * 8)  # the PBA is read-only
    assert table.pba() == 0


def test_function_mask_holds_every_vector(table: TableDriver, sink: RecordingMsiSink) -> None:
    table.program(0, 0x40)
    table.program(4, 0x44)
    table.control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
    assert table.control() == CONTROL_ENABLE | CONTROL_FUNCTION_MASK | (VECTORS - 1)
    table.function.msix.fire(4)
    table.function.msix.fire(0)
    assert sink.sent == [] and table.pba() == 0b10001
    table.control(CONTROL_ENABLE)
    assert sorted(sink.sent) == [(0, MSG_ADDRESS, 0x40), (4, MSG_ADDRESS, 0x44)]
    assert table.pba() == 0


def test_bad_vector_and_non_interrupt_address_are_dropped(table: TableDriver, sink: RecordingMsiSink) -> None:
    table.control(CONTROL_ENABLE)
    assert not table.function.msix.fire(VECTORS)
    table.write32(TABLE, 0x1000)  # a guest pointing an MSI at RAM
    table.mask(0, False)
    table.function.msix.fire(0)
    table.write32(TABLE + 4, 1)  # above 4 GiB
    table.write32(TABLE, MSG_ADDRESS)
    table.function.msix.fire(0)
    assert sink.sent == [] and table.function.msix.dropped == 3


def test_disabling_msix_keeps_the_table_and_reset_clears_it(
    table: TableDriver, sink: RecordingMsiSink
) -> None:
    modes: list[bool] = []
    table.function.msix.add_mode_listener(modes.append)
    table.program(1, 0x41)
    table.control(CONTROL_ENABLE)
    table.control(0)
    assert modes == [True, False]
    assert table.read32(TABLE + 24) == 0x41
    table.function.msix.reset()
    assert table.read32(TABLE + 24) == 0 and table.read32(TABLE + 28) == 1
    assert table.control() == VECTORS - 1


def test_vector_count_is_checked() -> None:
    with pytest.raises(ConfigError, match="MSI-X vectors"):
        MsixCapability(
            PciDevice(vendor_id=1, device_id=1, class_code=0),
            0,
            bar=0,
            table_offset=0,
            pba_offset=0x800,
            sink=RecordingMsiSink(),
        )


# -- KVM side -------------------------------------------------------------------------------------


def test_default_routes_match_kvm_create_irqchip() -> None:
    routes = default_irqchip_routes()
    assert (0, KVM_IRQCHIP_IOAPIC, 0) in routes and (0, KVM_IRQCHIP_PIC_MASTER, 0) in routes
    assert (9, KVM_IRQCHIP_PIC_SLAVE, 1) in routes and (23, KVM_IRQCHIP_IOAPIC, 23) in routes
    assert len(routes) == 16 * 2 + 8
    assert not any(gsi >= 16 and chip != KVM_IRQCHIP_IOAPIC for gsi, chip, _ in routes)


def test_routing_table_keeps_irqchip_routes_and_adds_msi_routes() -> None:
    vm = FakeRoutingVm()
    routing = GsiRouting(vm)
    first, second = routing.allocate(), routing.allocate()
    assert (first, second) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1)
    assert vm.tables == []  # nothing installed before a message exists
    routing.set_msi(second, MSG_ADDRESS | 0x1000, 0x4031)
    routing.set_msi(second, MSG_ADDRESS | 0x1000, 0x4031)  # unchanged: no second ioctl
    assert len(vm.tables) == 1 and routing.commits == 1
    table = vm.tables[0]
    irqchip = [(gsi, payload) for gsi, kind, payload in table if kind == KVM_IRQ_ROUTING_IRQCHIP]
    assert sorted((gsi, chip, pin) for gsi, (chip, pin) in irqchip) == sorted(default_irqchip_routes())
    assert [row for row in table if row[1] == KVM_IRQ_ROUTING_MSI] == [
        (second, KVM_IRQ_ROUTING_MSI, (MSG_ADDRESS | 0x1000, 0, 0x4031))
    ]
    routing.release(second)
    assert not [row for row in vm.tables[-1] if row[1] == KVM_IRQ_ROUTING_MSI]
    with pytest.raises(ConfigError, match="not allocated"):
        routing.set_msi(second, MSG_ADDRESS, 0)


def test_routing_runs_out_of_gsis() -> None:
    routing = GsiRouting(FakeRoutingVm(), limit=FIRST_MSI_GSI + 1)
    routing.allocate()
    with pytest.raises(ConfigError, match="no GSI left"):
        routing.allocate()


def test_irqfd_sink_fires_an_eventfd_on_a_routed_gsi() -> None:
    vm = FakeRoutingVm()
    routing = GsiRouting(vm)
    sink = IrqfdMsiSink(vm, routing, VECTORS)
    try:
        function = MsixFunction(sink)
        pci = PciBus()
        ports = PioBus()
        ports.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, pci)
        driver = TableDriver(function, PortDriver(ports), pci.add(function))
        assert sorted(vm.irqfds.values()) == list(range(FIRST_MSI_GSI, FIRST_MSI_GSI + VECTORS))
        driver.program(3, 0x61)
        driver.control(CONTROL_ENABLE)
        assert function.msix.fire(3)
        fd = sink.fds[3]
        assert os.eventfd_read(fd) == 1  # what KVM's irqfd would consume
        msi_rows = [row for row in vm.tables[-1] if row[1] == KVM_IRQ_ROUTING_MSI]
        assert msi_rows == [(sink.gsis[3], KVM_IRQ_ROUTING_MSI, (MSG_ADDRESS, 0, 0x61))]
        function.msix.fire(3)
        assert len(vm.tables) == 1  # the route is written once per message
    finally:
        sink.close()
    assert vm.irqfds == {} and routing.msi_routes() == {}


def test_direct_sink_uses_signal_msi() -> None:
    vm = FakeRoutingVm()
    sink = DirectMsiSink(vm)
    sink.program(0, MSG_ADDRESS, 0x30)
    sink.signal(0)
    assert vm.msis == [(MSG_ADDRESS, 0x30)]
