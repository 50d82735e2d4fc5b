"""ACPI tables for a minimal x86 machine, generated into guest memory, and a parser for them.

Layout, all in the legacy BIOS area (already E820-reserved by ``build_e820``), each table
16-byte aligned (the FACS 64-byte aligned), in this order from ``ACPI_AREA_START`` (0xE0000)::

    RSDP (v2, 36 bytes)  ->  XSDT  -> FADT, MADT     (RSDT with the same entries, for old OSes)
                                      FADT -> FACS, DSDT

The RSDP sits at 0xE0000, where Linux finds it by scanning 0xE0000-0xFFFFF on a BIOS boot
(the bzImage loader also passes it in boot_params.acpi_rsdp_addr). The MP table uses
0xF0000 and up (see ``mptable.py``), so the two never overlap.

Power management design (not HW-reduced ACPI; FADT revision 6.0): fixed-hardware registers
at I/O ports, the layout of QEMU's ICH9 power-management block:

    PM1a_EVT_BLK  0x600  4 bytes: PM1 status (u16, write 1 to clear) at 0x600, PM1 enable (u16) at 0x602
    PM1a_CNT_BLK  0x604  2 bytes: SCI_EN (bit 0, reads as 1: always in ACPI mode), SLP_TYP (bits 10-12),
                         SLP_EN (bit 13). Writing SLP_EN with SLP_TYP = 5 (the \\_S5 value) is soft-off:
                         the device model should stop the VM with exit status 0.
    PM_TMR_BLK    0x608  4 bytes: 24-bit ACPI PM timer at 3.579545 MHz (TMR_VAL_EXT clear)

SMI_CMD is 0, so the OS treats the machine as always in ACPI mode. The SCI is GSI 9,
level-triggered, active-high (the MADT has the matching interrupt source override). There
are no GPE blocks, no fixed power/sleep buttons and no VGA; ``cmos_rtc`` and ``i8042`` say
whether an RTC (ports 0x70/0x71) and an 8042 (0x60/0x64) are present. The DSDT holds
\\_S5 = Package {5, 5, 0, 0} and, under \\_SB, one ``Device(VRnn)`` with _HID "LNRO0005"
per virtio-mmio device.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol

from vmscope.arch.x86.acpi_registers import (
    PM1A_CNT_LENGTH,
    PM1A_CNT_PORT,
    PM1A_EVT_LENGTH,
    PM1A_EVT_PORT,
    PM_TMR_LENGTH,
    PM_TMR_PORT,
    S5_SLEEP_TYPE,
    SCI_IRQ,
)
from vmscope.arch.x86.e820 import E820Entry, E820Type
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory

ACPI_AREA_START = 0xE0000
ACPI_AREA_END = 0xF0000  # the MP table owns 0xF0000 and up
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000

LOCAL_APIC_ADDRESS = 0xFEE0_0000
IO_APIC_ADDRESS = 0xFEC0_0000
IO_APIC_GSI_BASE = 0

OEM_ID = b"VMSCOP"
OEM_TABLE_ID = b"VMSCOPE "
OEM_REVISION = 1
CREATOR_ID = b"VMSC"
CREATOR_REVISION = 1

TABLE_HEADER_SIZE = 36
RSDP_SIZE = 36
RSDP_V1_SIZE = 20
FACS_SIZE = 64
FACS_VERSION = 2
FADT_SIZE = 276  # ACPI 6.0 FADT, revision 6
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
MADT_REVISION = 4
DSDT_REVISION = 2  # 64-bit AML integers

# FADT fixed feature flags
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # 1: no fixed-feature sleep button
FADT_HW_REDUCED_ACPI = 1 << 20
# FADT IA-PC boot architecture flags
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# FADT field offsets (ACPI 6.x, table 5.9)
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46
FADT_SMI_CMD = 48
FADT_PM1A_EVT_BLK = 56
FADT_PM1A_CNT_BLK = 64
FADT_PM_TMR_BLK = 76
FADT_PM1_EVT_LEN = 88
FADT_PM1_CNT_LEN = 89
FADT_PM_TMR_LEN = 91
FADT_P_LVL2_LAT = 96
FADT_P_LVL3_LAT = 98
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_MINOR_VERSION = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_X_PM1A_EVT_BLK = 148
FADT_X_PM1A_CNT_BLK = 172
FADT_X_PM_TMR_BLK = 208
FADT_HYPERVISOR_VENDOR = 268

# MADT
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LAPIC_ENABLED = 1 << 0
# MPS INTI flags: polarity bits 1:0, trigger mode bits 3:2
MPS_INTI_CONFORMS = 0
MPS_INTI_ACTIVE_HIGH = 0b01
MPS_INTI_ACTIVE_LOW = 0b11
MPS_INTI_EDGE = 0b01 << 2
MPS_INTI_LEVEL = 0b11 << 2

GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE, GAS_ACCESS_WORD, GAS_ACCESS_DWORD = 1, 2, 3

#: the most vCPUs the tables describe: xAPIC ids are 8 bits, 0xFF is broadcast, and the
#: IO-APIC takes the id after the last CPU
MAX_CPUS = 254


class VirtioMmioDevice(NamedTuple):
    """A virtio-mmio transport the DSDT describes: register window and its GSI."""

    base: int
    size: int
    irq: int


class PhysicalMemory(Protocol):
    """What the parser needs from guest memory (``GuestMemory`` provides it)."""

    def read(self, gpa: int, length: int, /) -> bytes: ...


_NO_ADDRESSES: Mapping[str, int] = MappingProxyType({})


class AcpiTables(NamedTuple):
    """Where the generated tables went."""

    rsdp_address: int
    #: the guest-physical ranges the tables occupy, as E820 ACPI entries (inside the legacy
    #: BIOS hole that build_e820 already reserves, so passing them to the loader is optional)
    reserved_ranges: tuple[E820Entry, ...]
    #: signature -> guest-physical address of each table (RSDP, XSDT, RSDT, FADT, FACS, MADT, DSDT);
    #: a read-only empty mapping by default (a NamedTuple default is shared by every instance)
    addresses: Mapping[str, int] = _NO_ADDRESSES


# -- checksums and headers ----------------------------------------------------------------


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with that byte counted as 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _header(signature: bytes, length: int, revision: int) -> bytearray:
    return bytearray(
        struct.pack(
            "<4sIBB6s8sI4sI",
            signature,
            length,
            revision,
            0,
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            CREATOR_ID,
            CREATOR_REVISION,
        )
    )


def _finish_table(table: bytearray) -> bytes:
    """Fill in the length and checksum of a table that starts with a standard header."""
    struct.pack_into("<I", table, 4, len(table))
    table[9] = 0
    table[9] = checksum(table)
    return bytes(table)


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    return _finish_table(_header(signature, 0, revision) + body)


def _gas(address: int, bit_width: int, access_size: int) -> bytes:
    """A Generic Address Structure for an I/O port register."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, bit_width, 0, access_size, address)


# -- AML encoder (just the constructs the DSDT needs) -------------------------------------

AML_ZERO = 0x00
AML_ONE = 0x01
AML_ONES = 0xFF
AML_NAME_OP = 0x08
AML_BYTE_PREFIX = 0x0A
AML_WORD_PREFIX = 0x0B
AML_DWORD_PREFIX = 0x0C
AML_STRING_PREFIX = 0x0D
AML_QWORD_PREFIX = 0x0E
AML_SCOPE_OP = 0x10
AML_BUFFER_OP = 0x11
AML_PACKAGE_OP = 0x12
AML_EXT_OP_PREFIX = 0x5B
AML_DEVICE_OP = 0x82  # after AML_EXT_OP_PREFIX
AML_ROOT_CHAR = 0x5C
AML_DUAL_NAME_PREFIX = 0x2E
AML_MULTI_NAME_PREFIX = 0x2F


def aml_pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of ``body_length`` bytes; the encoded length counts its own bytes."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = extra << 6 | (total & 0xF)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_length} bytes exceeds PkgLength's 2^28 limit")


def _aml_name_seg(segment: str) -> bytes:
    if not 1 <= len(segment) <= 4 or not segment.isascii():
        raise ValueError(f"AML name segment {segment!r} must be 1-4 ASCII characters")
    if not (segment[0].isupper() or segment[0] == "_") or not all(
        c.isupper() or c.isdigit() or c == "_" for c in segment
    ):
        raise ValueError(f"AML name segment {segment!r} must be [A-Z_][A-Z0-9_]*")
    return segment.ljust(4, "_").encode()


def aml_name_string(path: str) -> bytes:
    """'\\_SB.VR00' -> root prefix + dual name path; '_HID' -> one name segment."""
    prefix = b""
    if path.startswith("\\"):
        prefix = bytes([AML_ROOT_CHAR])
        path = path[1:]
    segments = [_aml_name_seg(part) for part in path.split(".")] if path else []
    if not segments:
        return prefix + b"\x00"  # NullName
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([AML_DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([AML_MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def aml_integer(value: int) -> bytes:
    """The shortest AML encoding of a non-negative integer constant."""
    if value < 0 or value >> 64:
        raise ValueError(f"AML integer {value} is outside 0..2^64-1")
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    if value <= 0xFF:
        return bytes([AML_BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([AML_WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([AML_DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([AML_QWORD_PREFIX]) + struct.pack("<Q", value)


def aml_string(text: str) -> bytes:
    encoded = text.encode("ascii")
    if b"\0" in encoded:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([AML_STRING_PREFIX]) + encoded + b"\0"


def aml_name(name: str, value: bytes) -> bytes:
    """Name(name, value): ``value`` is an already-encoded data object."""
    return bytes([AML_NAME_OP]) + aml_name_string(name) + value


def aml_package(elements: Sequence[bytes]) -> bytes:
    if len(elements) > 0xFF:
        raise ValueError("AML Package() holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    body = aml_integer(len(data)) + data
    return bytes([AML_BUFFER_OP]) + aml_pkg_length(len(body)) + body


def aml_scope(name: str, terms: bytes) -> bytes:
    body = aml_name_string(name) + terms
    return bytes([AML_SCOPE_OP]) + aml_pkg_length(len(body)) + body


def aml_device(name: str, terms: bytes) -> bytes:
    body = aml_name_string(name) + terms
    return bytes([AML_EXT_OP_PREFIX, AML_DEVICE_OP]) + aml_pkg_length(len(body)) + body


# Resource descriptors (ACPI 6.x section 6.4)
RESOURCE_MEMORY32_FIXED = 0x86
RESOURCE_EXTENDED_INTERRUPT = 0x89
RESOURCE_END_TAG = 0x79
INTERRUPT_CONSUMER = 1 << 0
INTERRUPT_EDGE = 1 << 1  # clear: level-triggered
INTERRUPT_ACTIVE_LOW = 1 << 2  # clear: active-high
INTERRUPT_SHARED = 1 << 3


def resource_memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", RESOURCE_MEMORY32_FIXED, 9, int(writable), base, size)


def resource_interrupt(
    gsi: int, *, edge: bool = False, active_low: bool = False, shared: bool = False
) -> bytes:
    """Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) {gsi}."""
    flags = INTERRUPT_CONSUMER
    flags |= INTERRUPT_EDGE if edge else 0
    flags |= INTERRUPT_ACTIVE_LOW if active_low else 0
    flags |= INTERRUPT_SHARED if shared else 0
    return struct.pack("<BHBBI", RESOURCE_EXTENDED_INTERRUPT, 6, flags, 1, gsi)


def aml_resource_template(descriptors: Sequence[bytes]) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors plus an end tag (checksum 0 = none)."""
    return aml_buffer(b"".join(descriptors) + bytes([RESOURCE_END_TAG, 0]))


def virtio_mmio_aml(devices: Sequence[VirtioMmioDevice | tuple[int, int, int]]) -> bytes:
    """Scope(\\_SB) { Device(VRnn) { _HID "LNRO0005", _UID n, _CRS {Memory32Fixed, Interrupt} } ... }.

    The interrupt is level-triggered, active-high, exclusive: a virtio-mmio device holds its
    line while InterruptStatus is non-zero. Returns b"" for no devices.
    """
    if not devices:
        return b""
    if len(devices) > 0x100:
        raise ConfigError(f"{len(devices)} virtio-mmio devices: the DSDT names at most 256 (VR00-VRFF)")
    objects = []
    for index, raw in enumerate(devices):
        device = VirtioMmioDevice(*raw)
        if device.base < 0 or device.size <= 0 or device.base + device.size > 1 << 32:
            raise ConfigError(
                f"virtio-mmio device {index} at {device.base:#x}+{device.size:#x} "
                "is not a 32-bit address range"
            )
        if not 0 <= device.irq <= 0xFFFF_FFFF:
            raise ConfigError(f"virtio-mmio device {index} has invalid GSI {device.irq}")
        crs = aml_resource_template(
            [resource_memory32_fixed(device.base, device.size), resource_interrupt(device.irq)]
        )
        objects.append(
            aml_device(
                f"VR{index:02X}",
                aml_name("_HID", aml_string("LNRO0005"))
                + aml_name("_UID", aml_integer(index))
                + aml_name("_CRS", crs),
            )
        )
    return aml_scope("\\_SB", b"".join(objects))


def build_dsdt(extra_aml: bytes = b"") -> bytes:
    """The DSDT: \\_S5 (soft-off, SLP_TYP 5) followed by ``extra_aml`` (device objects)."""
    s5 = aml_name(
        "\\_S5",
        aml_package([aml_integer(S5_SLEEP_TYPE), aml_integer(S5_SLEEP_TYPE), aml_integer(0), aml_integer(0)]),
    )
    return _table(b"DSDT", DSDT_REVISION, s5 + extra_aml)


# -- tables ---------------------------------------------------------------------------------


def build_facs() -> bytes:
    """FACS (version 2): no checksum; hardware signature 0, no waking vector, global lock free."""
    facs = struct.pack("<4sIIIIIQB", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION)
    return facs + bytes(FACS_SIZE - len(facs))


def build_fadt(dsdt_address: int, facs_address: int, *, cmos_rtc: bool = False, i8042: bool = False) -> bytes:
    fadt = _header(b"FACP", FADT_SIZE, FADT_REVISION) + bytes(FADT_SIZE - TABLE_HEADER_SIZE)

    def put(fmt: str, offset: int, value: int | bytes) -> None:
        struct.pack_into(fmt, fadt, offset, value)

    put("<I", FADT_FIRMWARE_CTRL, facs_address)
    put("<I", FADT_DSDT, dsdt_address)
    put("<B", FADT_PREFERRED_PM_PROFILE, 0)  # unspecified
    put("<H", FADT_SCI_INT, SCI_IRQ)
    put("<I", FADT_SMI_CMD, 0)  # always in ACPI mode
    put("<I", FADT_PM1A_EVT_BLK, PM1A_EVT_PORT)
    put("<I", FADT_PM1A_CNT_BLK, PM1A_CNT_PORT)
    put("<I", FADT_PM_TMR_BLK, PM_TMR_PORT)
    put("<B", FADT_PM1_EVT_LEN, PM1A_EVT_LENGTH)
    put("<B", FADT_PM1_CNT_LEN, PM1A_CNT_LENGTH)
    put("<B", FADT_PM_TMR_LEN, PM_TMR_LENGTH)
    # latencies above 100/1000 us tell the OS C2/C3 are not supported
    put("<H", FADT_P_LVL2_LAT, 101)
    put("<H", FADT_P_LVL3_LAT, 1001)
    # Linux skips probing an 8042 and a CMOS RTC the FADT says are absent
    boot_arch = (
        IAPC_VGA_NOT_PRESENT | (0 if cmos_rtc else IAPC_CMOS_RTC_NOT_PRESENT) | (IAPC_8042 if i8042 else 0)
    )
    put("<H", FADT_IAPC_BOOT_ARCH, boot_arch)
    put("<I", FADT_FLAGS, FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put("<B", FADT_MINOR_VERSION, FADT_MINOR_REVISION)
    # X_FIRMWARE_CTRL stays 0: ACPICA installs the FACS once per non-zero pointer, and the
    # FACS is below 4 GiB anyway (QEMU does the same)
    put("<Q", FADT_X_DSDT, dsdt_address)
    fadt[FADT_X_PM1A_EVT_BLK : FADT_X_PM1A_EVT_BLK + 12] = _gas(PM1A_EVT_PORT, 32, GAS_ACCESS_WORD)
    fadt[FADT_X_PM1A_CNT_BLK : FADT_X_PM1A_CNT_BLK + 12] = _gas(PM1A_CNT_PORT, 16, GAS_ACCESS_WORD)
    fadt[FADT_X_PM_TMR_BLK : FADT_X_PM_TMR_BLK + 12] = _gas(PM_TMR_PORT, 32, GAS_ACCESS_DWORD)
    put("8s", FADT_HYPERVISOR_VENDOR, b"VMSCOPE\0")
    return _finish_table(fadt)


def io_apic_id(cpu_count: int) -> int:
    """The IO-APIC's id: the first APIC id after the CPUs' (MP spec: ids are unique)."""
    return cpu_count


def build_madt(cpu_count: int) -> bytes:
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS, MADT_PCAT_COMPAT))
    for cpu in range(cpu_count):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_LAPIC_ENABLED)
    body += struct.pack(
        "<BBBBII", MADT_IO_APIC, 12, io_apic_id(cpu_count), 0, IO_APIC_ADDRESS, IO_APIC_GSI_BASE
    )
    # ISA IRQ0 (the PIT) is wired to IO-APIC pin 2, as on PCs and in KVM's in-kernel IOAPIC
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, MPS_INTI_CONFORMS)
    body += struct.pack(
        "<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ, MPS_INTI_LEVEL | MPS_INTI_ACTIVE_HIGH
    )
    # NMI arrives on LINT1 of every processor (UID 0xFF = all)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, MPS_INTI_CONFORMS, 1)
    return _table(b"APIC", MADT_REVISION, bytes(body))


def build_xsdt(addresses: Sequence[int]) -> bytes:
    return _table(b"XSDT", 1, struct.pack(f"<{len(addresses)}Q", *addresses))


def build_rsdt(addresses: Sequence[int]) -> bytes:
    return _table(b"RSDT", 1, struct.pack(f"<{len(addresses)}I", *addresses))


def build_rsdp(xsdt_address: int, rsdt_address: int) -> bytes:
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_address, RSDP_SIZE, xsdt_address, 0)
    )
    rsdp[8] = checksum(rsdp[:RSDP_V1_SIZE])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_acpi_tables(
    memory: GuestMemory,
    cpu_count: int,
    *,
    virtio_mmio_devices: Sequence[VirtioMmioDevice | tuple[int, int, int]] = (),
    cmos_rtc: bool = False,
    i8042: bool = False,
    extra_dsdt_aml: bytes = b"",
) -> AcpiTables:
    """Write RSDP, XSDT, RSDT, FADT, FACS, MADT and DSDT into the BIOS area (layout above).

    ``cmos_rtc`` / ``i8042``: whether the machine has an RTC at ports 0x70-0x71 / an 8042 at
    0x60 and 0x64; the FADT's boot architecture flags tell the guest. ``extra_dsdt_aml``: more
    device objects for the DSDT's \\_SB scope (the PCI host bridge).
    """
    if not 1 <= cpu_count <= MAX_CPUS:
        raise ConfigError(f"ACPI tables describe 1 to {MAX_CPUS} vCPUs, not {cpu_count}")
    dsdt = build_dsdt(virtio_mmio_aml(virtio_mmio_devices) + extra_dsdt_aml)
    madt = build_madt(cpu_count)

    cursor = ACPI_AREA_START
    addresses: dict[str, int] = {}

    def reserve(name: str, size: int, alignment: int = 16) -> int:
        nonlocal cursor
        address = (cursor + alignment - 1) // alignment * alignment
        cursor = address + size
        addresses[name] = address
        return address

    rsdp_address = reserve("RSDP", RSDP_SIZE)
    xsdt_address = reserve("XSDT", TABLE_HEADER_SIZE + 8 * 2)
    rsdt_address = reserve("RSDT", TABLE_HEADER_SIZE + 4 * 2)
    fadt_address = reserve("FACP", FADT_SIZE)
    facs_address = reserve("FACS", FACS_SIZE, alignment=64)
    madt_address = reserve("APIC", len(madt))
    dsdt_address = reserve("DSDT", len(dsdt))
    if cursor > ACPI_AREA_END:
        raise ConfigError(
            f"ACPI tables need {cursor - ACPI_AREA_START} bytes; the BIOS area holds "
            f"{ACPI_AREA_END - ACPI_AREA_START}"
        )

    memory.fill(ACPI_AREA_START, cursor - ACPI_AREA_START)
    memory.write(dsdt_address, dsdt)
    memory.write(madt_address, madt)
    memory.write(facs_address, build_facs())
    memory.write(fadt_address, build_fadt(dsdt_address, facs_address, cmos_rtc=cmos_rtc, i8042=i8042))
    memory.write(rsdt_address, build_rsdt([fadt_address, madt_address]))
    memory.write(xsdt_address, build_xsdt([fadt_address, madt_address]))
    memory.write(rsdp_address, build_rsdp(xsdt_address, rsdt_address))
    used = (cursor - ACPI_AREA_START + 0xFFF) & ~0xFFF
    return AcpiTables(
        rsdp_address=rsdp_address,
        reserved_ranges=(E820Entry(ACPI_AREA_START, used, E820Type.ACPI),),
        addresses=addresses,
    )


# -- parser (tests, diagnostics) ----------------------------------------------------------


class AcpiParseError(ValueError):
    """The tables in guest memory are not what the ACPI spec requires."""


class AcpiTable(NamedTuple):
    signature: str
    address: int
    length: int
    revision: int
    checksum_ok: bool
    oem_id: bytes
    data: bytes


class MadtEntry(NamedTuple):
    type: int
    length: int
    data: bytes


class ParsedMadt(NamedTuple):
    local_apic_address: int
    flags: int
    entries: tuple[MadtEntry, ...]

    def local_apics(self) -> list[tuple[int, int, int]]:
        """(processor UID, APIC id, flags) for each Processor Local APIC entry."""
        return [(e.data[0], e.data[1], struct.unpack_from("<I", e.data, 2)[0]) for e in self.of_type(0)]

    def io_apics(self) -> list[tuple[int, int, int]]:
        """(IO-APIC id, address, GSI base)."""
        return [(e.data[0], *struct.unpack_from("<II", e.data, 2)) for e in self.of_type(1)]

    def overrides(self) -> list[tuple[int, int, int, int]]:
        """(bus, source IRQ, GSI, MPS INTI flags) for each interrupt source override."""
        return [(e.data[0], e.data[1], *struct.unpack_from("<IH", e.data, 2)) for e in self.of_type(2)]

    def of_type(self, entry_type: int) -> list[MadtEntry]:
        return [e for e in self.entries if e.type == entry_type]


class ParsedAcpi(NamedTuple):
    rsdp_address: int
    rsdp_revision: int
    rsdp_checksum_ok: bool
    rsdp_extended_checksum_ok: bool
    xsdt_address: int
    rsdt_address: int
    tables: dict[str, AcpiTable]

    def madt(self) -> ParsedMadt:
        return parse_madt(self.tables["APIC"].data)

    def fadt_field(self, fmt: str, offset: int) -> int:
        return int(struct.unpack_from(fmt, self.tables["FACP"].data, offset)[0])


def find_rsdp(memory: PhysicalMemory, start: int = BIOS_AREA_START, end: int = BIOS_AREA_END) -> int:
    """Scan [start, end) on 16-byte boundaries for a checksummed "RSD PTR " like an OS does."""
    area = memory.read(start, end - start)
    for offset in range(0, len(area) - RSDP_V1_SIZE + 1, 16):
        if area[offset : offset + 8] == b"RSD PTR " and sum(area[offset : offset + RSDP_V1_SIZE]) & 0xFF == 0:
            return start + offset
    raise AcpiParseError(f"no RSDP in {start:#x}-{end:#x}")


def read_table(memory: PhysicalMemory, address: int) -> AcpiTable:
    header = memory.read(address, TABLE_HEADER_SIZE)
    signature, length, revision, _, oem_id = struct.unpack_from("<4sIBB6s", header)
    if length < TABLE_HEADER_SIZE or length > 1 << 20:
        raise AcpiParseError(f"table at {address:#x} ({signature!r}) has implausible length {length}")
    data = memory.read(address, length)
    return AcpiTable(
        signature=signature.decode("ascii", "replace"),
        address=address,
        length=length,
        revision=revision,
        checksum_ok=sum(data) & 0xFF == 0,
        oem_id=oem_id,
        data=data,
    )


def parse_madt(data: bytes) -> ParsedMadt:
    local_apic_address, flags = struct.unpack_from("<II", data, TABLE_HEADER_SIZE)
    entries = []
    offset = TABLE_HEADER_SIZE + 8
    while offset < len(data):
        if offset + 2 > len(data):
            raise AcpiParseError(f"MADT entry header at offset {offset} runs past the table")
        entry_type, length = data[offset], data[offset + 1]
        if length < 2 or offset + length > len(data):
            raise AcpiParseError(f"MADT entry at offset {offset} has bad length {length}")
        entries.append(MadtEntry(entry_type, length, data[offset + 2 : offset + length]))
        offset += length
    return ParsedMadt(local_apic_address, flags, tuple(entries))


def parse_acpi_tables(memory: PhysicalMemory, rsdp_address: int | None = None) -> ParsedAcpi:
    """Find the RSDP (or use ``rsdp_address``) and read every table it reaches."""
    if rsdp_address is None:
        rsdp_address = find_rsdp(memory)
    rsdp = memory.read(rsdp_address, RSDP_SIZE)
    if rsdp[:8] != b"RSD PTR ":
        raise AcpiParseError(f"no RSDP signature at {rsdp_address:#x}")
    revision = rsdp[15]
    rsdt_address, length, xsdt_address = struct.unpack_from("<IIQ", rsdp, 16)
    tables: dict[str, AcpiTable] = {}
    pointers: list[int] = []
    if xsdt_address:
        xsdt = read_table(memory, xsdt_address)
        tables["XSDT"] = xsdt
        count = (xsdt.length - TABLE_HEADER_SIZE) // 8
        pointers += struct.unpack_from(f"<{count}Q", xsdt.data, TABLE_HEADER_SIZE)
    if rsdt_address:
        rsdt = read_table(memory, rsdt_address)
        tables["RSDT"] = rsdt
        count = (rsdt.length - TABLE_HEADER_SIZE) // 4
        pointers += [
            p for p in struct.unpack_from(f"<{count}I", rsdt.data, TABLE_HEADER_SIZE) if p not in pointers
        ]
    for pointer in pointers:
        table = read_table(memory, pointer)
        tables[table.signature] = table
    if "FACP" in tables:
        fadt = tables["FACP"].data
        dsdt_address = struct.unpack_from("<Q", fadt, FADT_X_DSDT)[0] if len(fadt) >= FADT_X_DSDT + 8 else 0
        dsdt_address = dsdt_address or struct.unpack_from("<I", fadt, FADT_DSDT)[0]
        if dsdt_address:
            tables["DSDT"] = read_table(memory, dsdt_address)
        facs_address = struct.unpack_from("<I", fadt, FADT_FIRMWARE_CTRL)[0]
        if not facs_address and len(fadt) >= FADT_X_FIRMWARE_CTRL + 8:
            facs_address = struct.unpack_from("<Q", fadt, FADT_X_FIRMWARE_CTRL)[0]
        if facs_address:
            signature, facs_length = struct.unpack("<4sI", memory.read(facs_address, 8))
            tables["FACS"] = AcpiTable(
                signature=signature.decode("ascii", "replace"),
                address=facs_address,
                length=facs_length,
                revision=0,
                checksum_ok=True,  # the FACS has no checksum
                oem_id=b"",
                data=memory.read(facs_address, facs_length),
            )
    return ParsedAcpi(
        rsdp_address=rsdp_address,
        rsdp_revision=revision,
        rsdp_checksum_ok=sum(rsdp[:RSDP_V1_SIZE]) & 0xFF == 0,
        rsdp_extended_checksum_ok=length == RSDP_SIZE and sum(rsdp) & 0xFF == 0,
        xsdt_address=xsdt_address,
        rsdt_address=rsdt_address,
        tables=tables,
    )
