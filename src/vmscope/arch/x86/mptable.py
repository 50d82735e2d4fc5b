"""Intel MultiProcessor Specification 1.4 tables, generated into guest memory, and a parser.

The floating pointer structure sits at ``MPTABLE_START`` (0xF0000), inside the BIOS ROM area
that Linux scans for "_MP_" when it has no ACPI MADT (e.g. ``acpi=off``; the kernel must have
CONFIG_X86_MPPARSE). The configuration table follows it at 0xF0010. The ACPI tables live at
0xE0000-0xEFFFF (``acpi.py``), so both can be present.

Contents: one processor entry per vCPU (APIC id = CPU index, CPU 0 flagged as the bootstrap
processor), bus 0 = ISA, one IO-APIC (id = CPU count, 0xFEC00000), IO interrupt entries for
ISA IRQs 0-15 except the cascade IRQ 2 (IRQ0, the PIT, goes to pin 2 and every other IRQ n to
pin n), and local interrupt entries LINT0 = ExtINT (the 8259 in virtual-wire mode) and LINT1 = NMI.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vmscope.arch.x86.acpi import IO_APIC_ADDRESS, LOCAL_APIC_ADDRESS, MAX_CPUS, PhysicalMemory, io_apic_id
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory

MPTABLE_START = 0xF0000
MPTABLE_END = 0x100000
FLOATING_POINTER_SIZE = 16
CONFIG_HEADER_SIZE = 44
SPEC_REVISION = 4  # MP spec 1.4
OEM_ID = b"VMSCOPE "
PRODUCT_ID = b"VMSCOPE-MP  "

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IO_APIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4
ENTRY_SIZES = {
    ENTRY_PROCESSOR: 20,
    ENTRY_BUS: 8,
    ENTRY_IO_APIC: 8,
    ENTRY_IO_INTERRUPT: 8,
    ENTRY_LOCAL_INTERRUPT: 8,
}

CPU_ENABLED = 1 << 0
CPU_BOOTSTRAP = 1 << 1
IO_APIC_ENABLED = 1 << 0
LOCAL_APIC_VERSION = 0x14  # integrated xAPIC, as KVM reports
IO_APIC_VERSION = 0x11  # 82093AA-compatible, as KVM's in-kernel IOAPIC reports
#: family 6 in the processor signature; feature flags: FPU and on-chip APIC (CPUID.1:EDX)
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)

INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_SMI = 2
INT_TYPE_EXTINT = 3
INT_FLAGS_CONFORMS = 0
ALL_LOCAL_APICS = 0xFF

ISA_BUS_ID = 0
ISA_IRQ_COUNT = 16
CASCADE_IRQ = 2


def isa_irq_to_pin(irq: int) -> int:
    """The IO-APIC pin an ISA IRQ arrives on (IRQ0 is rerouted to pin 2)."""
    return 2 if irq == 0 else irq


class MpTable(NamedTuple):
    floating_pointer_address: int
    config_table_address: int
    #: bytes from the floating pointer to the end of the configuration table
    size: int


def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def build_mptable_entries(cpu_count: int) -> list[bytes]:
    entries = []
    for cpu in range(cpu_count):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x", ENTRY_PROCESSOR, cpu, LOCAL_APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES
            )
        )
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    ioapic = io_apic_id(cpu_count)
    entries.append(
        struct.pack("<BBBBI", ENTRY_IO_APIC, ioapic, IO_APIC_VERSION, IO_APIC_ENABLED, IO_APIC_ADDRESS)
    )
    for irq in range(ISA_IRQ_COUNT):
        if irq == CASCADE_IRQ:
            continue
        entries.append(
            struct.pack(
                "<BBHBBBB",
                ENTRY_IO_INTERRUPT,
                INT_TYPE_INT,
                INT_FLAGS_CONFORMS,
                ISA_BUS_ID,
                irq,
                ioapic,
                isa_irq_to_pin(irq),
            )
        )
    for lint, int_type in ((0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)):
        entries.append(
            struct.pack(
                "<BBHBBBB",
                ENTRY_LOCAL_INTERRUPT,
                int_type,
                INT_FLAGS_CONFORMS,
                ISA_BUS_ID,
                0,
                ALL_LOCAL_APICS,
                lint,
            )
        )
    return entries


def build_mptable(memory: GuestMemory, cpu_count: int, *, address: int = MPTABLE_START) -> MpTable:
    """Write the floating pointer at ``address`` and the configuration table right after it."""
    if not 1 <= cpu_count <= MAX_CPUS:
        raise ConfigError(f"the MP table describes 1 to {MAX_CPUS} vCPUs, not {cpu_count}")
    if address % 16:
        raise ConfigError(f"MP floating pointer address {address:#x} is not 16-byte aligned")
    entries = build_mptable_entries(cpu_count)
    config_address = address + FLOATING_POINTER_SIZE
    body = b"".join(entries)
    config = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            CONFIG_HEADER_SIZE + len(body),
            SPEC_REVISION,
            0,
            OEM_ID,
            PRODUCT_ID,
            0,  # no OEM table
            0,
            len(entries),
            LOCAL_APIC_ADDRESS,
            0,  # no extended entries
            0,
            0,
        )
        + body
    )
    config[7] = _checksum(config)
    # feature byte 1 = 0: a configuration table is present; byte 2 bit 7 clear: virtual-wire mode
    pointer = bytearray(struct.pack("<4sIBBB5s", b"_MP_", config_address, 1, SPEC_REVISION, 0, bytes(5)))
    pointer[10] = _checksum(pointer)
    end = config_address + len(config)
    if end > MPTABLE_END:
        raise ConfigError(f"MP table for {cpu_count} vCPUs ends at {end:#x}, past the BIOS area")
    memory.write(address, pointer)
    memory.write(config_address, config)
    return MpTable(address, config_address, end - address)


# -- parser (tests, diagnostics) ----------------------------------------------------------


class MpTableParseError(ValueError):
    """The MP structures in guest memory are malformed."""


class MpEntry(NamedTuple):
    type: int
    data: bytes


class ParsedMpTable(NamedTuple):
    floating_pointer_address: int
    floating_pointer_checksum_ok: bool
    spec_revision: int
    feature_bytes: bytes
    config_table_address: int
    config_checksum_ok: bool
    base_table_length: int
    oem_id: bytes
    product_id: bytes
    local_apic_address: int
    entries: tuple[MpEntry, ...]

    def of_type(self, entry_type: int) -> list[MpEntry]:
        return [e for e in self.entries if e.type == entry_type]

    def processors(self) -> list[tuple[int, int, int]]:
        """(APIC id, APIC version, CPU flags) per processor entry."""
        return [(e.data[1], e.data[2], e.data[3]) for e in self.of_type(ENTRY_PROCESSOR)]

    def buses(self) -> list[tuple[int, str]]:
        return [(e.data[1], e.data[2:8].decode("ascii").rstrip()) for e in self.of_type(ENTRY_BUS)]

    def io_apics(self) -> list[tuple[int, int, int, int]]:
        """(id, version, flags, address)."""
        return [
            (e.data[1], e.data[2], e.data[3], struct.unpack_from("<I", e.data, 4)[0]) for e in self.of_type(2)
        ]

    def interrupts(self, entry_type: int) -> list[tuple[int, int, int, int, int, int]]:
        """(type, flags, source bus, source IRQ, destination id, destination pin/LINT)."""
        return [
            (e.data[1], struct.unpack_from("<H", e.data, 2)[0], e.data[4], e.data[5], e.data[6], e.data[7])
            for e in self.of_type(entry_type)
        ]


def find_floating_pointer(memory: PhysicalMemory, start: int = MPTABLE_START, end: int = MPTABLE_END) -> int:
    """Scan [start, end) on 16-byte boundaries for a checksummed "_MP_" like an OS does."""
    area = memory.read(start, end - start)
    for offset in range(0, len(area) - FLOATING_POINTER_SIZE + 1, 16):
        candidate = area[offset : offset + FLOATING_POINTER_SIZE]
        if candidate[:4] == b"_MP_" and sum(candidate) & 0xFF == 0:
            return start + offset
    raise MpTableParseError(f"no MP floating pointer in {start:#x}-{end:#x}")


def parse_mptable(memory: PhysicalMemory, pointer_address: int | None = None) -> ParsedMpTable:
    if pointer_address is None:
        pointer_address = find_floating_pointer(memory)
    pointer = memory.read(pointer_address, FLOATING_POINTER_SIZE)
    if pointer[:4] != b"_MP_":
        raise MpTableParseError(f"no _MP_ signature at {pointer_address:#x}")
    config_address, length_paragraphs, revision = struct.unpack_from("<IBB", pointer, 4)
    if length_paragraphs != 1:
        raise MpTableParseError(f"floating pointer length is {length_paragraphs} paragraphs, expected 1")
    header = memory.read(config_address, CONFIG_HEADER_SIZE)
    signature, base_length, _, _, oem_id, product_id, _, _, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", header
    )
    if signature != b"PCMP":
        raise MpTableParseError(f"no PCMP signature at {config_address:#x}")
    if base_length < CONFIG_HEADER_SIZE:
        raise MpTableParseError(f"configuration table length {base_length} is shorter than its header")
    config = memory.read(config_address, base_length)
    entries = []
    offset = CONFIG_HEADER_SIZE
    for index in range(count):
        if offset >= base_length:
            raise MpTableParseError(f"entry {index} of {count} starts past the table's end")
        entry_type = config[offset]
        size = ENTRY_SIZES.get(entry_type)
        if size is None or offset + size > base_length:
            raise MpTableParseError(f"entry {index} at offset {offset} has bad type {entry_type}")
        entries.append(MpEntry(entry_type, config[offset : offset + size]))
        offset += size
    if offset != base_length:
        raise MpTableParseError(f"{count} entries end at {offset}, table length is {base_length}")
    return ParsedMpTable(
        floating_pointer_address=pointer_address,
        floating_pointer_checksum_ok=sum(pointer) & 0xFF == 0,
        spec_revision=revision,
        feature_bytes=pointer[11:16],
        config_table_address=config_address,
        config_checksum_ok=sum(config) & 0xFF == 0,
        base_table_length=base_length,
        oem_id=oem_id,
        product_id=product_id,
        local_apic_address=lapic,
        entries=tuple(entries),
    )
