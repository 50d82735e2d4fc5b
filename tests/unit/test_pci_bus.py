"""PCI bus 0 through configuration mechanism #1, the way a guest reaches it: ports 0xCF8 and 0xCFC-0xCFF.

``PortDriver`` (tests/unit/rigs/pci.py, shared by the PCI test modules) does what Linux's
``pci_conf1_read`` and ``pci_conf1_write`` do on a port bus with the :class:`PciBus` mapped at 0xCF8.
"""

from __future__ import annotations

import struct

import pytest

from tests.unit.rigs.pci import PortDriver, conf1_address
from vmscope.arch.x86.acpi import build_dsdt
from vmscope.bus import MmioBus, PioBus
from vmscope.errors import BusConflictError, ConfigError
from vmscope.pci.bus import (
    CONFIG_ADDRESS_PORT,
    CONFIG_PORTS_LENGTH,
    HOST_BRIDGE_DEVICE_ID,
    HOST_BRIDGE_VENDOR_ID,
    PCI_MMIO_WINDOW_BASE,
    PCI_MMIO_WINDOW_SIZE,
    PciBus,
    eisa_id,
    intx_gsi,
    pci_host_bridge_aml,
)
from vmscope.pci.device import (
    CAP_ID_VENDOR,
    COMMAND_MEMORY,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    STATUS_CAP_LIST,
    BarKind,
    PciDevice,
)

ABSENT = 0xFFFF_FFFF


class SampleFunction(PciDevice):
    """A function with a 64-bit BAR, a 32-bit BAR, an I/O BAR and two capabilities."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000, revision=7, interrupt_pin=1)
        self.add_bar(0, 0x4000, BarKind.MEMORY64, address=0xE000_4000)
        self.add_bar(2, 0x100, BarKind.MEMORY32, prefetchable=True)
        self.add_bar(3, 0x20, BarKind.IO)
        self.cap_writes = 0
        self.first = self.add_capability(CAP_ID_VENDOR, bytes([6, 0xAA, 0xBB, 0xCC]))
        self.second = self.add_capability(0x05, bytes([1, 2]), writable=b"\xff\x00", on_write=self._counted)
        self.reads: list[tuple[int, int, int]] = []
        self.writes: list[tuple[int, int, bytes]] = []

    def _counted(self) -> None:
        self.cap_writes += 1

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        self.reads.append((index, offset, size))
        return bytes(range(offset & 0xFF, (offset & 0xFF) + size))

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.writes.append((index, offset, data))


@pytest.fixture
def pci() -> PciBus:
    return PciBus()


@pytest.fixture
def ports(pci: PciBus) -> PioBus:
    bus = PioBus()
    bus.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, pci)
    return bus


@pytest.fixture
def driver(ports: PioBus) -> PortDriver:
    return PortDriver(ports)


def test_host_bridge_answers_at_00_00_0(driver: PortDriver) -> None:
    assert driver.read(0, 0x00) == HOST_BRIDGE_DEVICE_ID << 16 | HOST_BRIDGE_VENDOR_ID
    assert driver.read(0, 0x08) >> 8 == 0x060000  # class: host bridge
    assert driver.read(0, PCI_HEADER_TYPE, 1) == 0  # type 0, single function
    assert driver.read(0, 0x0A, 2) == 0x0600  # what pci_sanity_check reads


def test_absent_functions_buses_and_disabled_cycles_read_all_ones(driver: PortDriver, ports: PioBus) -> None:
    assert driver.read(5, 0x00) == ABSENT
    assert driver.read(0, 0x00, function=1) == ABSENT
    assert driver.read(0, 0x00, bus=1) == ABSENT
    assert driver.read(5, 0x02, 2) == 0xFFFF
    assert driver.read(5, 0x03, 1) == 0xFF
    ports.write(CONFIG_ADDRESS_PORT, struct.pack("<I", 0x0000_0000))  # enable bit clear
    assert ports.read(0xCFC, 4) == b"\xff" * 4
    driver.write(5, PCI_COMMAND, 0xFFFF, 2)  # nobody there: dropped, nothing raised


def test_config_address_register_reads_back_and_ignores_narrow_accesses(ports: PioBus) -> None:
    # Linux's pci_check_type1: outb(0x01, 0xCFB); tmp = inl(0xCF8); outl(0x80000000, 0xCF8); inl(0xCF8)
    ports.write(0xCFB, b"\x01")
    assert ports.read(0xCF8, 4) == b"\x00\x00\x00\x00"
    ports.write(0xCF8, struct.pack("<I", 0x8000_0000))
    assert struct.unpack("<I", ports.read(0xCF8, 4))[0] == 0x8000_0000
    ports.write(0xCF8, struct.pack("<I", 0xFFFF_FFFF))
    assert struct.unpack("<I", ports.read(0xCF8, 4))[0] == 0x8FFF_FFFC  # bits 30:28 and 1:0 read as 0
    # type 2 probe: byte accesses at 0xCF8/0xCFA neither change the register nor read it
    ports.write(0xCF8, b"\x00")
    assert ports.read(0xCF8, 1) == b"\xff"
    assert ports.read(0xCFA, 1) == b"\xff"
    assert struct.unpack("<I", ports.read(0xCF8, 4))[0] == 0x8FFF_FFFC


@pytest.mark.parametrize("size", [1, 2, 4])
def test_data_port_reads_every_size_at_every_offset(driver: PortDriver, pci: PciBus, size: int) -> None:
    pci.add(SampleFunction(), slot=3)
    dword = driver.read(3, 0x00)
    for byte in range(0, 4, size) if size > 1 else range(4):
        assert driver.read(3, byte, size) == (dword >> (8 * byte)) & ((1 << 8 * size) - 1)
    # unaligned widths the x86 `in` instruction allows too: a word at 0xCFD, 0xCFE
    assert driver.read(3, 0x01, 2) == (dword >> 8) & 0xFFFF
    assert driver.read(3, 0x03, 1) == dword >> 24


def test_access_running_past_0xcff_gets_all_ones_there(ports: PioBus, pci: PciBus) -> None:
    pci.add(SampleFunction(), slot=3)
    ports.write(CONFIG_ADDRESS_PORT, struct.pack("<I", conf1_address(0, 3, 0, 0)))
    data = ports.read(0xCFE, 4)
    assert data[:2] == struct.pack("<H", 0x5678) and data[2:] == b"\xff\xff"


def test_writes_respect_read_only_fields(driver: PortDriver, pci: PciBus) -> None:
    pci.add(SampleFunction(), slot=3)
    driver.write(3, 0x00, 0xDEAD_BEEF)  # vendor/device ids are read-only
    assert driver.read(3, 0x00) == 0x5678_1234
    driver.write(3, PCI_INTERRUPT_LINE, 0x2B, 1)
    driver.write(3, PCI_INTERRUPT_PIN, 0x04, 1)  # read-only
    assert driver.read(3, PCI_INTERRUPT_LINE, 2) == 0x01_2B
    driver.write(3, PCI_ROM_ADDRESS, 0xFFFF_F800)  # no expansion ROM: the BAR stays 0
    assert driver.read(3, PCI_ROM_ADDRESS) == 0
    driver.write(3, PCI_COMMAND, 0xFFFF, 2)
    command = driver.read(3, PCI_COMMAND, 2)
    assert command & COMMAND_MEMORY and command & 0x1  # I/O space is writable: it has an I/O BAR
    assert not command & 0xF8B8  # reserved and hardwired bits stay 0


def test_status_error_bits_are_write_one_to_clear(driver: PortDriver, pci: PciBus) -> None:
    device = SampleFunction()
    pci.add(device, slot=3)
    device.set_u16(PCI_STATUS, device.u16(PCI_STATUS) | 0x2000)  # received master abort
    driver.write(3, PCI_STATUS, 0x0000, 2)
    assert driver.read(3, PCI_STATUS, 2) & 0x2000
    driver.write(3, PCI_STATUS, 0x2000 | STATUS_CAP_LIST, 2)
    status = driver.read(3, PCI_STATUS, 2)
    assert not status & 0x2000 and status & STATUS_CAP_LIST  # the read-only bit survives


def test_bar_sizing_reads_back_the_size_mask_and_flags(driver: PortDriver, pci: PciBus) -> None:
    pci.add(SampleFunction(), slot=3)
    original, sized = driver.size_bar(3, 0)
    assert original == 0xE000_4000 | 0b100  # pre-assigned, 64-bit memory
    assert sized == 0xFFFF_C000 | 0b100  # ~(0x4000 - 1) with the type bits
    high_original, high_sized = driver.size_bar(3, 1)
    assert (high_original, high_sized) == (0, 0xFFFF_FFFF)  # a < 4 GiB BAR: upper dword all writable
    assert driver.size_bar(3, 2) == (0b1000, 0xFFFF_FF00 | 0b1000)  # 32-bit prefetchable, 256 bytes
    assert driver.size_bar(3, 3) == (0b1, 0xFFFF_FFE0 | 0b1)  # I/O, 32 ports
    assert driver.size_bar(3, 4) == (0, 0)  # unimplemented BARs read 0 whatever is written
    assert driver.read(3, PCI_BASE_ADDRESS_0) == original  # restored


def test_capability_walk_finds_each_capability(driver: PortDriver, pci: PciBus) -> None:
    device = SampleFunction()
    pci.add(device, slot=3)
    assert driver.capabilities(3) == [(CAP_ID_VENDOR, device.first), (0x05, device.second)]
    assert device.first == 0x40 and device.second % 4 == 0
    assert driver.read(3, device.first + 2, 2) == 0xAA06  # a dword at 0x42 would run past 0xCFF
    assert driver.read(3, device.first + 4, 2) == 0xCCBB
    driver.write(3, device.second + 2, 0x7777, 2)
    assert driver.read(3, device.second + 2, 2) == 0x0277  # only the first body byte is writable
    assert device.cap_writes == 1
    driver.write(3, device.first, 0x12, 1)  # outside the second capability: no callback
    assert device.cap_writes == 1
    assert driver.capabilities(0) == []  # the host bridge has none (and no Capabilities List bit)


def test_bars_decode_in_the_window_only_while_memory_space_is_on(driver: PortDriver, pci: PciBus) -> None:
    mmio = MmioBus()
    mmio.register(pci.window_base, pci.window_size, pci.mmio_window)
    device = SampleFunction()
    pci.add(device, slot=3)
    assert mmio.read(0xE000_4010, 4) == b"\xff" * 4  # Memory Space off: nothing decodes
    driver.write(3, PCI_COMMAND, COMMAND_MEMORY, 2)
    assert mmio.read(0xE000_4010, 4) == bytes([0x10, 0x11, 0x12, 0x13])
    mmio.write(0xE000_5FFC, b"\x01\x02")
    assert device.reads[-1] == (0, 0x10, 4) and device.writes[-1] == (0, 0x1FFC, b"\x01\x02")
    # BAR 2 has address 0: not decoded until the driver assigns one inside the window
    driver.write(3, PCI_BASE_ADDRESS_0 + 8, 0xE100_0000)
    assert mmio.read(0xE100_0004, 2) == bytes([4, 5])
    assert device.reads[-1] == (2, 4, 2)
    # moved outside the window: no longer reachable, and the old address is free
    driver.write(3, PCI_BASE_ADDRESS_0 + 8, 0xD000_0000)
    assert [d.index for d in device.decoded_bars()] == [0]
    assert mmio.read(0xE100_0004, 2) == b"\xff\xff"
    # 64-bit BAR moved by the driver (low dword, then high)
    driver.write(3, PCI_BASE_ADDRESS_0, 0xE200_0000)
    assert mmio.read(0xE200_0000, 1) == b"\x00" and mmio.read(0xE000_4000, 1) == b"\xff"
    driver.write(3, PCI_BASE_ADDRESS_0 + 4, 0x1)  # now above 4 GiB, outside the window
    assert device.decoded_bars() == ()
    assert pci.mmio_window.unclaimed


def test_slots_are_handed_out_in_order_and_checked(pci: PciBus) -> None:
    assert pci.add(SampleFunction()) == 1
    assert pci.add(SampleFunction()) == 2
    assert pci.add(SampleFunction(), slot=9) == 9
    with pytest.raises(ConfigError, match="taken"):
        pci.add(SampleFunction(), slot=9)
    with pytest.raises(ConfigError, match="out of range"):
        pci.add(SampleFunction(), slot=32)
    for _ in range(28):
        pci.add(SampleFunction())
    with pytest.raises(ConfigError, match="full"):
        pci.add(SampleFunction())


def test_bar_addresses_are_aligned_and_stay_in_the_window(pci: PciBus) -> None:
    first = pci.allocate_bar_address(0x8000)
    second = pci.allocate_bar_address(0x100)
    third = pci.allocate_bar_address(0x8000)
    assert first == PCI_MMIO_WINDOW_BASE and second == first + 0x8000 and third == first + 0x10000
    with pytest.raises(ConfigError, match="no room"):
        pci.allocate_bar_address(PCI_MMIO_WINDOW_SIZE)


def test_window_avoids_the_other_fixed_addresses() -> None:
    end = PCI_MMIO_WINDOW_BASE + PCI_MMIO_WINDOW_SIZE
    for address in (0xFEB0_0000, 0xFEC0_0000, 0xFEE0_0000, 0xD000_0000, 0xFFFB_C000, 0xC000_0000 - 1):
        assert not PCI_MMIO_WINDOW_BASE <= address < end
    mmio = MmioBus()
    pci = PciBus()
    mmio.register(pci.window_base, pci.window_size, pci.mmio_window)
    with pytest.raises(BusConflictError):
        mmio.register(0xE800_0000, 0x1000, pci.mmio_window)


def test_bad_bar_declarations_are_refused() -> None:
    device = PciDevice(vendor_id=1, device_id=2, class_code=0)
    with pytest.raises(ConfigError, match="power of two"):
        device.add_bar(0, 0x3000, BarKind.MEMORY32)
    with pytest.raises(ConfigError, match="aligned"):
        device.add_bar(0, 0x1000, BarKind.MEMORY32, address=0xE000_0800)
    device.add_bar(4, 0x1000, BarKind.MEMORY64)
    with pytest.raises(ConfigError, match="taken"):
        device.add_bar(5, 0x1000, BarKind.MEMORY32)
    with pytest.raises(ConfigError, match="out of range"):
        device.add_bar(5, 0x1000, BarKind.MEMORY64)


def test_intx_swizzle() -> None:
    assert [intx_gsi(slot) for slot in (0, 1, 7, 8, 9)] == [16, 17, 23, 16, 17]
    assert intx_gsi(1, pin=4) == 20


def test_eisa_id_matches_asl_eisaid() -> None:
    assert eisa_id("PNP0A03") == 0x030AD041
    assert eisa_id("PNP0501") == 0x0105D041


def test_host_bridge_aml_describes_pnp0a03_with_windows_and_prt() -> None:
    aml = pci_host_bridge_aml(slots=[1, 2])
    assert aml.startswith(b"\x10")  # ScopeOp
    assert b"\\_SB_" in aml and b"\x5b\x82" in aml and b"PCI0" in aml  # DeviceOp PCI0
    assert b"_HID\x0c" + struct.pack("<I", 0x030AD041) in aml
    for name in (b"_UID", b"_SEG", b"_BBN", b"_CRS", b"_PRT"):
        assert name in aml
    # bus numbers 0-255 (WordBusNumber), the config ports (IO), the MMIO window (DWordMemory)
    assert struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, 0, 0xFF, 0, 0x100) in aml
    assert bytes([0x47, 1]) + struct.pack("<HHBB", 0xCF8, 0xCF8, 1, 8) in aml
    window = struct.pack("<IIIII", 0, 0xE000_0000, 0xEFFF_FFFF, 0, 0x1000_0000)
    assert bytes([0x87, 23, 0, 0, 0x0C, 1]) + window in aml
    # _PRT: Package(8) of {0x0001FFFF, pin, Zero, GSI}
    prt = aml[aml.index(b"_PRT") + 4 :]
    length_bytes = (prt[1] >> 6) + 1
    assert prt[0] == 0x12 and prt[1 + length_bytes] == 8  # PackageOp, PkgLength, NumElements
    entry = b"\x12\x0b\x04\x0c" + struct.pack("<I", 0x0001_FFFF) + b"\x00\x00\x0a\x11"
    assert entry in prt  # slot 1, INTA -> GSI 17
    dsdt = build_dsdt(aml)
    assert sum(dsdt) & 0xFF == 0 and dsdt.endswith(aml)


def test_host_bridge_aml_default_lists_every_slot() -> None:
    prt = pci_host_bridge_aml()
    prt = prt[prt.index(b"_PRT") + 4 :]
    assert prt[0] == 0x12 and prt[1 + (prt[1] >> 6) + 1] == 32 * 4
    assert b"\x0c\xff\xff\x1f\x00\x0a\x03\x00\x0a\x12" in prt  # slot 31, INTD -> 16 + (31 + 3) % 8


def test_closing_the_bus_closes_its_functions(pci: PciBus) -> None:
    closed = []

    class Closing(SampleFunction):
        def close(self) -> None:
            closed.append(self)

    device = Closing()
    pci.add(device)
    pci.close()
    assert closed == [device]
