"""A PCI function with a 256-byte type 0 configuration space (PCI Local Bus 3.0, chapter 6).

The configuration space is a byte array plus two masks: ``writable`` (bits the driver can
change; everything else is read-only) and ``write_one_to_clear`` (status bits a 1 clears).
Every write goes through the masks byte by byte, so any access size at any offset behaves
like the hardware would, and a subclass only reacts to the effects it cares about through
:meth:`PciDevice.config_written` and :meth:`PciDevice.decode_changed`.

BARs. :meth:`PciDevice.add_bar` makes the low bits of a BAR read-only (its type flags and the
address bits below its size), so the usual sizing sequence (write all-ones, read back,
restore) yields ``~(size - 1) | flags`` without special cases. A memory BAR decodes while
the command register's Memory Space bit is set and its address lies inside the window the
bus forwards (see :mod:`vmscope.pci.bus`); :meth:`PciDevice.decoded_bars` says where.

Capabilities. :meth:`PciDevice.add_capability` appends one to the list at 0x34 (dword
aligned, from 0x40 on), sets the status register's Capabilities List bit and can register a
callback that runs after the driver wrote inside the capability.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmscope.devices.state import StateReader
from vmscope.errors import ConfigError

log = logging.getLogger("vmscope.pci")

CONFIG_SPACE_SIZE = 256

# -- type 0 header offsets -----------------------------------------------------------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A  # sub-class at 0x0A, base class at 0x0B
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_NUM_BARS = 6
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
CAPABILITIES_START = 0x40

# -- command and status bits ------------------------------------------------------------------------
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
#: the error bits of the status register (write 1 to clear); vmscope never sets them
STATUS_ERRORS = 0xF900

# -- BAR flag bits ------------------------------------------------------------------------------------
BAR_IO_SPACE = 1 << 0
BAR_MEMORY_64 = 0b10 << 1
BAR_PREFETCHABLE = 1 << 3

# -- capability ids -----------------------------------------------------------------------------------
CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11

#: the value of a configuration read nobody answers
ALL_ONES = 0xFFFF_FFFF


class BarKind(enum.Enum):
    MEMORY32 = "mem32"
    MEMORY64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class PciBar:
    """One base address register: its index, size (a power of two) and kind."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        if self.kind is BarKind.IO:
            return BAR_IO_SPACE
        flags = BAR_MEMORY_64 if self.kind is BarKind.MEMORY64 else 0
        return flags | (BAR_PREFETCHABLE if self.prefetchable else 0)


@dataclass(frozen=True)
class DecodedBar:
    """A memory BAR that currently decodes: guest-physical [address, address + size)."""

    index: int
    address: int
    size: int


@dataclass
class _Capability:
    cap_id: int
    offset: int
    length: int
    on_write: Callable[[], None] | None


class PciDevice:
    """One PCI function: configuration space, BARs and capabilities (see the module docstring)."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
        name: str = "pci-device",
    ) -> None:
        self.name = name
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.writable = bytearray(CONFIG_SPACE_SIZE)
        self.write_one_to_clear = bytearray(CONFIG_SPACE_SIZE)
        self.bars: dict[int, PciBar] = {}
        self._capabilities: list[_Capability] = []
        self._next_capability = CAPABILITIES_START
        #: set by the bus: (address, size) -> whether the bus forwards that range to devices
        self.window_check: Callable[[int, int], bool] = lambda address, size: True
        #: called after the set of decoded BARs changed (the bus rebuilds its lookup)
        self.decode_listeners: list[Callable[[PciDevice], None]] = []
        self._decoded: tuple[DecodedBar, ...] = ()

        self.set_u16(PCI_VENDOR_ID, vendor_id)
        self.set_u16(PCI_DEVICE_ID, device_id)
        self.set_u8(PCI_REVISION_ID, revision)
        self.set_u8(PCI_CLASS_PROG, class_code & 0xFF)
        self.set_u16(PCI_CLASS_DEVICE, class_code >> 8)
        self.set_u8(PCI_HEADER_TYPE, 0x00)  # type 0, single function
        self.set_u16(PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(PCI_SUBSYSTEM_ID, subsystem_id)
        self.set_u8(PCI_INTERRUPT_PIN, interrupt_pin)
        command_mask = COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE
        self._set_mask(self.writable, PCI_COMMAND, 2, command_mask)
        self._set_mask(self.write_one_to_clear, PCI_STATUS, 2, STATUS_ERRORS)
        self._set_mask(self.writable, PCI_CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(self.writable, PCI_LATENCY_TIMER, 1, 0xFF)
        self._set_mask(self.writable, PCI_INTERRUPT_LINE, 1, 0xFF)

    # -- building the configuration space -------------------------------------------------------

    def set_u8(self, offset: int, value: int) -> None:
        self.config[offset] = value & 0xFF

    def set_u16(self, offset: int, value: int) -> None:
        self.config[offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def set_u32(self, offset: int, value: int) -> None:
        self.config[offset : offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def u8(self, offset: int) -> int:
        return self.config[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.config[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.config[offset : offset + 4], "little")

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset : offset + size] = value.to_bytes(size, "little")

    def add_bar(
        self, index: int, size: int, kind: BarKind, *, prefetchable: bool = False, address: int = 0
    ) -> PciBar:
        """Declare BAR ``index`` (a 64-bit BAR also takes ``index + 1``), pre-assigned at ``address``."""
        slots = 2 if kind is BarKind.MEMORY64 else 1
        minimum = 4 if kind is BarKind.IO else 16
        if not 0 <= index <= PCI_NUM_BARS - slots or any(i in self.bars for i in range(index, index + slots)):
            raise ConfigError(f"{self.name}: BAR {index} is out of range or already taken")
        if size < minimum or size & (size - 1) or (kind is not BarKind.MEMORY64 and size > 1 << 31):
            raise ConfigError(f"{self.name}: BAR {index} size {size:#x} is not a valid power of two")
        if address % size:
            raise ConfigError(f"{self.name}: BAR {index} address {address:#x} is not {size:#x}-aligned")
        bar = PciBar(index, size, kind, prefetchable)
        for i in range(index, index + slots):
            self.bars[i] = bar
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        low_flags = 0x3 if kind is BarKind.IO else 0xF
        self._set_mask(self.writable, offset, 4, ~(size - 1) & ~low_flags & 0xFFFF_FFFF)
        self.set_u32(offset, (address & 0xFFFF_FFFF & ~low_flags) | bar.flags)
        if kind is BarKind.MEMORY64:
            self._set_mask(self.writable, offset + 4, 4, ~((size - 1) >> 32) & 0xFFFF_FFFF)
            self.set_u32(offset + 4, address >> 32)
        if kind is BarKind.IO:
            self._set_mask(self.writable, PCI_COMMAND, 2, int.from_bytes(self.writable[4:6], "little") | 1)
        self._update_decode()
        return bar

    def add_capability(
        self, cap_id: int, body: bytes, *, writable: bytes = b"", on_write: Callable[[], None] | None = None
    ) -> int:
        """Append a capability (``body`` follows the id and next-pointer bytes); returns its offset.

        ``writable`` masks the body's bytes the driver may change (default: none);
        ``on_write`` runs after a configuration write that touched the capability.
        """
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SPACE_SIZE:
            raise ConfigError(f"{self.name}: no room for capability {cap_id:#x} in configuration space")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2 : offset + length] = body
        self.writable[offset + 2 : offset + 2 + len(writable)] = writable
        if self._capabilities:
            self.config[self._capabilities[-1].offset + 1] = offset
        else:
            self.set_u8(PCI_CAPABILITY_LIST, offset)
            self.set_u16(PCI_STATUS, self.u16(PCI_STATUS) | STATUS_CAP_LIST)
        self._capabilities.append(_Capability(cap_id, offset, length, on_write))
        self._next_capability = (offset + length + 3) & ~3
        return offset

    def capability_offsets(self) -> list[tuple[int, int]]:
        """(capability id, offset) in list order."""
        return [(cap.cap_id, cap.offset) for cap in self._capabilities]

    # -- configuration access (the bus calls these) -----------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (the bus keeps accesses inside one dword)."""
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return b"\xff" * size
        self.before_config_read(offset, size)
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        """Apply a driver write through the writable and write-1-to-clear masks, then its effects."""
        if offset < 0 or offset + len(data) > CONFIG_SPACE_SIZE:
            return
        for index, value in enumerate(data):
            at = offset + index
            old = self.config[at]
            new = (old & ~self.writable[at]) | (value & self.writable[at])
            new &= ~(value & self.write_one_to_clear[at])
            self.config[at] = new & 0xFF
        end = offset + len(data)
        if offset < PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS and end > PCI_COMMAND:
            self._update_decode()
        for cap in self._capabilities:
            if cap.on_write is not None and offset < cap.offset + cap.length and cap.offset < end:
                cap.on_write()
        self.config_written(offset, len(data))

    # -- hooks for subclasses ----------------------------------------------------------------------

    def before_config_read(self, offset: int, size: int) -> None:
        """Refresh dynamic fields before a read of [offset, offset + size) (default: none)."""

    def config_written(self, offset: int, size: int) -> None:
        """The driver wrote [offset, offset + size) (default: nothing more to do)."""

    def decode_changed(self, decoded: tuple[DecodedBar, ...]) -> None:
        """The BARs that decode changed (moved, enabled or disabled)."""

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        """A guest read inside BAR ``index`` (default: zeros)."""
        return bytes(size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """A guest write inside BAR ``index`` (default: ignored)."""

    def close(self) -> None:
        """Release host resources (default: none)."""

    # -- state ----------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The configuration space as plain data (subclasses add their own fields)."""
        return {"config": self.config.hex()}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Load the configuration space of the same kind of function and re-decode its BARs."""
        self.load_config_state(StateReader(self.name, state))

    def load_config_state(self, reader: StateReader) -> None:
        config = reader.hex_bytes("config", CONFIG_SPACE_SIZE)
        for offset, size in ((PCI_VENDOR_ID, 2), (PCI_DEVICE_ID, 2), (PCI_CLASS_PROG, 3)):
            if config[offset : offset + size] != self.config[offset : offset + size]:
                raise reader.error(
                    "config", f"identity bytes at {offset:#x} belong to another kind of function"
                )
        self.config[:] = config
        self._update_decode()

    # -- BAR decoding -----------------------------------------------------------------------------

    def bar_address(self, index: int) -> int:
        """The address BAR ``index`` holds now (flag bits removed)."""
        bar = self.bars[index]
        low = self.u32(PCI_BASE_ADDRESS_0 + 4 * bar.index)
        if bar.kind is BarKind.IO:
            return low & ~0x3
        address = low & ~0xF
        if bar.kind is BarKind.MEMORY64:
            address |= self.u32(PCI_BASE_ADDRESS_0 + 4 * bar.index + 4) << 32
        return address

    @property
    def command(self) -> int:
        return self.u16(PCI_COMMAND)

    def decoded_bars(self) -> tuple[DecodedBar, ...]:
        """Memory BARs that decode now: Memory Space enabled, address inside the bus window."""
        return self._decoded

    def _compute_decode(self) -> tuple[DecodedBar, ...]:
        if not self.command & COMMAND_MEMORY:
            return ()
        decoded = []
        for index, bar in sorted(self.bars.items()):
            if index != bar.index or bar.kind is BarKind.IO:
                continue  # the upper half of a 64-bit BAR; I/O BARs are not forwarded
            address = self.bar_address(index)
            if address and self.window_check(address, bar.size):
                decoded.append(DecodedBar(index, address, bar.size))
        return tuple(decoded)

    def _update_decode(self) -> None:
        decoded = self._compute_decode()
        if decoded == self._decoded:
            return
        self._decoded = decoded
        log.debug(
            "%s: BARs decode at %s", self.name, [f"{d.index}:{d.address:#x}" for d in decoded] or "none"
        )
        self.decode_changed(decoded)
        for listener in self.decode_listeners:
            listener(self)

    def refresh_decode(self) -> None:
        """Recompute which BARs decode (after the bus changed :attr:`window_check`)."""
        self._update_decode()
