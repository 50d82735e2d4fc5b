"""PCI bus 0 behind a host bridge: configuration mechanism #1 and the MMIO window the BARs live in.

Configuration access (PCI Local Bus 3.0 section 3.2.2.3.2). :class:`PciBus` is ONE port
device at 0xCF8-0xCFF:

* CONFIG_ADDRESS, 0xCF8, 32-bit accesses only: bit 31 enable, bits 23:16 bus, 15:11 device,
  10:8 function, 7:2 dword register; bits 27:24 extend the register number past 255 (an AMD
  extension Linux uses only with extended configuration space, which this bus does not
  have: such registers read as all-ones). Bits 30:28 and 1:0 read as 0. Byte and word
  accesses to 0xCF8-0xCFB do not touch the register (that is how Linux's probe tells
  mechanism #1 from #2) and read as all-ones.
* CONFIG_DATA, 0xCFC-0xCFF, any size at any of the four ports: the bytes of the selected
  dword at that byte offset. With bit 31 clear, on a bus other than 0, or for a function
  that does not exist, reads give all-ones and writes are dropped, as a master abort does.

Devices. 00:00.0 is a host bridge (class 0x060000) with Intel's vendor id 0x8086 and device
id 0x29C0, the Q35 memory controller hub that QEMU's q35 machine also shows, so Linux (and
its ``pci_sanity_check``, which wants a host bridge or an Intel device on bus 0) treats it as
an ordinary chipset. Other functions take slots 1-31, function 0, single-function.

MMIO window. Every BAR vmscope assigns lies in :data:`PCI_MMIO_WINDOW_BASE` (0xE000_0000) to
+ :data:`PCI_MMIO_WINDOW_SIZE` (256 MiB), inside the 32-bit hole above RAM (which ends at
0xC000_0000 at the most), clear of virtio-mmio (0xFEB0_0000), the IO-APIC (0xFEC0_0000), the
LAPIC (0xFEE0_0000), KVM's TSS/identity pages (0xFFFB_C000) and the demo guest's probe address
(0xD000_0000). :class:`PciMmioWindow` is the one MMIO-bus device for the whole window: it hands
each access to the function whose BAR decodes there (Memory Space on, address inside the
window), so BARs can move without the machine remapping anything. A BAR moved outside the
window decodes nothing. The window is also what the ACPI host bridge's _CRS offers the OS
(:func:`pci_host_bridge_aml`), so Linux keeps the pre-assigned addresses.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import Counter
from collections.abc import Mapping, Sequence

from vmscope.arch.x86.acpi import (
    aml_device,
    aml_integer,
    aml_name,
    aml_package,
    aml_resource_template,
    aml_scope,
)
from vmscope.devices.base import Device
from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError
from vmscope.pci.device import DecodedBar, PciDevice

log = logging.getLogger("vmscope.pci.bus")

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_PORTS_LENGTH = 8
CONFIG_ENABLE = 1 << 31
#: the CONFIG_ADDRESS bits that read back (enable, extended register, bus, device, function, register)
CONFIG_ADDRESS_MASK = 0x8FFF_FFFC

PCI_MMIO_WINDOW_BASE = 0xE000_0000
PCI_MMIO_WINDOW_SIZE = 0x1000_0000
PCI_SLOTS = 32

HOST_BRIDGE_VENDOR_ID = 0x8086
HOST_BRIDGE_DEVICE_ID = 0x29C0
CLASS_HOST_BRIDGE = 0x06_00_00

#: first GSI of the four-wire INTx swizzle (IO-APIC pins 16-23; ISA IRQs keep 0-15)
INTX_GSI_BASE = 16
INTX_GSI_COUNT = 8


def intx_gsi(slot: int, pin: int = 1) -> int:
    """The GSI INTx pin ``pin`` (1 = INTA) of ``slot`` is wired to: 16 + (slot + pin - 1) mod 8."""
    return INTX_GSI_BASE + (slot + pin - 1) % INTX_GSI_COUNT


class PciHostBridge(PciDevice):
    """00:00.0: a host bridge with no BARs, only there to be found."""

    def __init__(self) -> None:
        super().__init__(
            vendor_id=HOST_BRIDGE_VENDOR_ID,
            device_id=HOST_BRIDGE_DEVICE_ID,
            class_code=CLASS_HOST_BRIDGE,
            name="pci-host-bridge",
        )


class PciMmioWindow(Device):
    """The MMIO-bus device for the whole BAR window (see the module docstring)."""

    name = "pci-mmio"

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.base = bus.window_base
        #: (address, size) -> count of accesses no BAR claimed
        self.unclaimed: Counter[tuple[int, int]] = Counter()

    def read(self, offset: int, size: int) -> bytes:
        target = self.bus.find_bar(self.base + offset)
        if target is None:
            self.unclaimed[self.base + offset, size] += 1
            return b"\xff" * size
        device, decoded = target
        return device.bar_read(decoded.index, self.base + offset - decoded.address, size)

    def write(self, offset: int, data: bytes) -> None:
        target = self.bus.find_bar(self.base + offset)
        if target is None:
            self.unclaimed[self.base + offset, len(data)] += 1
            return
        device, decoded = target
        device.bar_write(decoded.index, self.base + offset - decoded.address, data)


class PciBus(Device):
    """Bus 0: the 0xCF8/0xCFC configuration ports as one port-bus device, and its functions."""

    name = "pci-conf1"

    def __init__(
        self, *, window_base: int = PCI_MMIO_WINDOW_BASE, window_size: int = PCI_MMIO_WINDOW_SIZE
    ) -> None:
        if window_base % 0x1000 or window_size <= 0 or window_base + window_size > 1 << 32:
            raise ConfigError(
                f"PCI MMIO window {window_base:#x}+{window_size:#x} must be page-aligned below 4 GiB"
            )
        self.window_base = window_base
        self.window_size = window_size
        self._address = 0
        self._functions: dict[int, PciDevice] = {}  # devfn -> function
        self._decode: list[tuple[int, int, PciDevice, DecodedBar]] = []  # (start, end, device, bar)
        self._next_bar_address = window_base
        self._lock = threading.RLock()
        self.mmio_window = PciMmioWindow(self)
        #: configuration accesses that reached no function, for statistics
        self.master_aborts = 0
        self.host_bridge = PciHostBridge()
        self.add(self.host_bridge, slot=0)

    # -- functions ---------------------------------------------------------------------------------

    def add(self, device: PciDevice, *, slot: int | None = None) -> int:
        """Put ``device`` at ``slot`` (default: the lowest free one), function 0; returns the slot."""
        with self._lock:
            if slot is None:
                free = [n for n in range(1, PCI_SLOTS) if n << 3 not in self._functions]
                if not free:
                    raise ConfigError(f"{device.name}: PCI bus 0 is full ({PCI_SLOTS - 1} slots)")
                slot = free[0]
            if not 0 <= slot < PCI_SLOTS:
                raise ConfigError(f"{device.name}: PCI slot {slot} is out of range 0-{PCI_SLOTS - 1}")
            if slot << 3 in self._functions:
                raise ConfigError(
                    f"{device.name}: PCI slot {slot} is taken by {self._functions[slot << 3].name}"
                )
            self._functions[slot << 3] = device
            device.window_check = self.in_window
            device.decode_listeners.append(self._decode_changed)
            device.refresh_decode()
            self._rebuild_decode()
            return slot

    def function(self, slot: int, function: int = 0) -> PciDevice | None:
        return self._functions.get(slot << 3 | function)

    def functions(self) -> list[tuple[int, PciDevice]]:
        """(slot, device) in slot order."""
        return [(devfn >> 3, device) for devfn, device in sorted(self._functions.items())]

    def slot_of(self, device: PciDevice) -> int:
        for devfn, candidate in self._functions.items():
            if candidate is device:
                return devfn >> 3
        raise ConfigError(f"{device.name} is not on this PCI bus")

    def allocate_bar_address(self, size: int) -> int:
        """A naturally aligned ``size``-byte range of the window, never handed out before."""
        with self._lock:
            address = (self._next_bar_address + size - 1) // size * size
            if address + size > self.window_base + self.window_size:
                raise ConfigError(
                    f"the PCI MMIO window {self.window_base:#x}+{self.window_size:#x} has no room for "
                    f"another {size:#x}-byte BAR"
                )
            self._next_bar_address = address + size
            return address

    def in_window(self, address: int, size: int) -> bool:
        return self.window_base <= address and address + size <= self.window_base + self.window_size

    # -- BAR lookup ----------------------------------------------------------------------------------

    def _decode_changed(self, device: PciDevice) -> None:
        self._rebuild_decode()

    def _rebuild_decode(self) -> None:
        with self._lock:
            table = []
            for device in self._functions.values():
                for decoded in device.decoded_bars():
                    table.append((decoded.address, decoded.address + decoded.size, device, decoded))
            table.sort(key=lambda row: row[0])
            self._decode = table

    def find_bar(self, address: int) -> tuple[PciDevice, DecodedBar] | None:
        """The function and BAR decoding ``address`` (the first one, should a guest overlap two)."""
        for start, end, device, decoded in self._decode:
            if start <= address < end:
                return device, decoded
        return None

    # -- configuration mechanism #1 (Device interface, ports 0xCF8-0xCFF) -------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return self._address.to_bytes(4, "little")
            return b"\xff" * size
        with self._lock:
            address = self._address
        return self._data_read(address, offset - 4, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 4:
            if offset == 0 and len(data) == 4:
                with self._lock:
                    self._address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK
            return
        with self._lock:
            address = self._address
        self._data_write(address, offset - 4, data)

    def _target(self, address: int) -> tuple[PciDevice, int] | None:
        if not address & CONFIG_ENABLE or address >> 24 & 0xF or address >> 16 & 0xFF:
            return None
        device = self._functions.get(address >> 8 & 0xFF)
        if device is None:
            return None
        return device, address & 0xFC

    def _data_read(self, address: int, byte: int, size: int) -> bytes:
        inside = max(0, min(size, 4 - byte))  # an access running past 0xCFF gets all-ones there
        target = self._target(address)
        if target is None:
            self.master_aborts += 1
            return b"\xff" * size
        device, register = target
        return device.read_config(register + byte, inside) + b"\xff" * (size - inside)

    def _data_write(self, address: int, byte: int, data: bytes) -> None:
        target = self._target(address)
        if target is None:
            self.master_aborts += 1
            return
        device, register = target
        with self._lock:
            device.write_config(register + byte, bytes(data[: max(0, 4 - byte)]))

    # -- direct configuration access (tests, diagnostics) -----------------------------------------

    def config_read(self, slot: int, function: int, offset: int, size: int) -> int:
        """What a driver reads through 0xCF8/0xCFC at bus 0, ``slot``.``function``, ``offset``."""
        address = CONFIG_ENABLE | slot << 11 | function << 8 | (offset & 0xFC)
        return int.from_bytes(self._data_read(address, offset & 3, size), "little")

    def config_write(self, slot: int, function: int, offset: int, size: int, value: int) -> None:
        address = CONFIG_ENABLE | slot << 11 | function << 8 | (offset & 0xFC)
        self._data_write(address, offset & 3, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    # -- state -------------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """CONFIG_ADDRESS and every function's state, by slot (the functions are saved with the bus)."""
        with self._lock:
            return {
                "config_address": self._address,
                "functions": {str(slot): device.save_state() for slot, device in self.functions()},
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Load into a bus with the same functions in the same slots."""
        reader = StateReader(self.name, state)
        address = reader.integer("config_address", 0, CONFIG_ADDRESS_MASK)
        if address & ~CONFIG_ADDRESS_MASK:
            raise reader.error("config_address", f"{address:#x} sets reserved bits")
        functions = reader.section("functions")
        saved_slots = sorted(functions.mapping())
        present = [str(slot) for slot, _ in self.functions()]
        if saved_slots != sorted(present):
            raise reader.error("functions", f"slots {saved_slots} do not match this bus's {sorted(present)}")
        with self._lock:
            for slot, device in self.functions():
                section = functions.section(str(slot))
                device.load_state(section.mapping())
            self._address = address
            self._rebuild_decode()

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every function on the bus (the machine closes the bus with its port devices)."""
        with self._lock:
            functions, self._functions = list(self._functions.values()), {}
            self._decode = []
        for device in functions:
            try:
                device.close()
            except Exception:  # one failing device must not leak the others
                log.exception("closing PCI function %s failed", device.name)


# -- ACPI: the host bridge in the DSDT ----------------------------------------------------------------

RESOURCE_IO_PORT = 0x47
RESOURCE_DWORD_ADDRESS = 0x87
RESOURCE_WORD_ADDRESS = 0x88
ADDRESS_SPACE_MEMORY = 0
ADDRESS_SPACE_IO = 1
ADDRESS_SPACE_BUS = 2
#: general flags: minimum and maximum address fixed, positive decode, producer
ADDRESS_FIXED_PRODUCER = 0b1100
IO_RANGE_ENTIRE = 0b11
MEMORY_READ_WRITE = 1 << 0  # non-cacheable, read-write


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA id of e.g. "PNP0A03" (what ASL's EISAID() produces)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"EISA id {text!r} must be three capital letters and four hex digits")
    letters = [ord(c) - 0x40 for c in text[:3]]
    product = int(text[3:], 16)
    vendor = letters[0] << 10 | letters[1] << 5 | letters[2]
    return int.from_bytes(vendor.to_bytes(2, "big") + product.to_bytes(2, "big"), "little")


def resource_word_address(space: int, minimum: int, maximum: int, *, type_flags: int = 0) -> bytes:
    """WordBusNumber / WordIO (producer, fixed range, no translation)."""
    length = maximum - minimum + 1
    body = struct.pack("<BBBHHHHH", space, ADDRESS_FIXED_PRODUCER, type_flags, 0, minimum, maximum, 0, length)
    return struct.pack("<BH", RESOURCE_WORD_ADDRESS, len(body)) + body


def resource_dword_memory(minimum: int, maximum: int) -> bytes:
    """DWordMemory (producer, fixed range, non-cacheable, read-write, no translation)."""
    length = maximum - minimum + 1
    body = struct.pack(
        "<BBBIIIII",
        ADDRESS_SPACE_MEMORY,
        ADDRESS_FIXED_PRODUCER,
        MEMORY_READ_WRITE,
        0,
        minimum,
        maximum,
        0,
        length,
    )
    return struct.pack("<BH", RESOURCE_DWORD_ADDRESS, len(body)) + body


def resource_io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length)."""
    return struct.pack("<BBHHBB", RESOURCE_IO_PORT, 1, base, base, 1, length)


def pci_host_bridge_aml(
    *,
    window_base: int = PCI_MMIO_WINDOW_BASE,
    window_size: int = PCI_MMIO_WINDOW_SIZE,
    slots: Sequence[int] = (),
) -> bytes:
    """Scope(\\_SB) { Device(PCI0) {...} }: the PNP0A03 host bridge Linux scans bus 0 through.

    _HID PNP0A03, _UID/_SEG/_BBN 0; _CRS: bus numbers 0-255, the configuration ports
    0xCF8-0xCFF (consumed), I/O 0x0000-0x0CF7 and 0x0D00-0xFFFF, and the MMIO window; _PRT:
    INTA-INTD of ``slots`` (default every slot) wired straight to GSIs 16-23 (:func:`intx_gsi`),
    which the OS then programs level-triggered, active-low, as for any _PRT GSI entry.
    """
    crs = aml_resource_template(
        [
            resource_word_address(ADDRESS_SPACE_BUS, 0x00, 0xFF),
            resource_io_port(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH),
            resource_word_address(ADDRESS_SPACE_IO, 0x0000, 0x0CF7, type_flags=IO_RANGE_ENTIRE),
            resource_word_address(ADDRESS_SPACE_IO, 0x0D00, 0xFFFF, type_flags=IO_RANGE_ENTIRE),
            resource_dword_memory(window_base, window_base + window_size - 1),
        ]
    )
    routes = []
    for slot in slots or range(PCI_SLOTS):
        for pin in range(4):
            routes.append(
                aml_package(
                    [
                        aml_integer(slot << 16 | 0xFFFF),
                        aml_integer(pin),
                        aml_integer(0),
                        aml_integer(intx_gsi(slot, pin + 1)),
                    ]
                )
            )
    body = (
        aml_name("_HID", aml_integer(eisa_id("PNP0A03")))
        + aml_name("_UID", aml_integer(0))
        + aml_name("_SEG", aml_integer(0))
        + aml_name("_BBN", aml_integer(0))
        + aml_name("_CRS", crs)
        + aml_name("_PRT", aml_package(routes))
    )
    return aml_scope("\\_SB", aml_device("PCI0", body))
