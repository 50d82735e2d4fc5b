"""struct boot_params / setup_header layout and the zero-page writer/reader."""

from __future__ import annotations

import struct

import pytest

from vmscope.arch.x86 import boot_params as bp
from vmscope.arch.x86.e820 import E820Entry, E820Type
from vmscope.errors import ConfigError
from vmscope.memory.guest_memory import GuestMemory

# Offsets as listed in Documentation/arch/x86/boot.rst ("The real-mode kernel header") and
# zero-page.rst.
DOCUMENTED_OFFSETS = {
    "SETUP_SECTS": (0x1F1, 1),
    "ROOT_FLAGS": (0x1F2, 2),
    "SYSSIZE": (0x1F4, 4),
    "RAM_SIZE": (0x1F8, 2),
    "VID_MODE": (0x1FA, 2),
    "ROOT_DEV": (0x1FC, 2),
    "BOOT_FLAG": (0x1FE, 2),
    "JUMP": (0x200, 2),
    "HEADER": (0x202, 4),
    "VERSION": (0x206, 2),
    "REALMODE_SWTCH": (0x208, 4),
    "START_SYS_SEG": (0x20C, 2),
    "KERNEL_VERSION": (0x20E, 2),
    "TYPE_OF_LOADER": (0x210, 1),
    "LOADFLAGS": (0x211, 1),
    "SETUP_MOVE_SIZE": (0x212, 2),
    "CODE32_START": (0x214, 4),
    "RAMDISK_IMAGE": (0x218, 4),
    "RAMDISK_SIZE": (0x21C, 4),
    "BOOTSECT_KLUDGE": (0x220, 4),
    "HEAP_END_PTR": (0x224, 2),
    "EXT_LOADER_VER": (0x226, 1),
    "EXT_LOADER_TYPE": (0x227, 1),
    "CMD_LINE_PTR": (0x228, 4),
    "INITRD_ADDR_MAX": (0x22C, 4),
    "KERNEL_ALIGNMENT": (0x230, 4),
    "RELOCATABLE_KERNEL": (0x234, 1),
    "MIN_ALIGNMENT": (0x235, 1),
    "XLOADFLAGS": (0x236, 2),
    "CMDLINE_SIZE": (0x238, 4),
    "HARDWARE_SUBARCH": (0x23C, 4),
    "HARDWARE_SUBARCH_DATA": (0x240, 8),
    "PAYLOAD_OFFSET": (0x248, 4),
    "PAYLOAD_LENGTH": (0x24C, 4),
    "SETUP_DATA": (0x250, 8),
    "PREF_ADDRESS": (0x258, 8),
    "INIT_SIZE": (0x260, 4),
    "HANDOVER_OFFSET": (0x264, 4),
    "KERNEL_INFO_OFFSET": (0x268, 4),
    # zero-page.rst
    "ACPI_RSDP_ADDR": (0x070, 8),
    "EXT_RAMDISK_IMAGE": (0x0C0, 4),
    "EXT_RAMDISK_SIZE": (0x0C4, 4),
    "EXT_CMD_LINE_PTR": (0x0C8, 4),
    "E820_ENTRIES": (0x1E8, 1),
    "SENTINEL": (0x1EF, 1),
    "E820_TABLE": (0x2D0, 20 * 128),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_OFFSETS))
def test_offsets_match_the_boot_protocol_document(name: str) -> None:
    offset, _ = DOCUMENTED_OFFSETS[name]
    assert getattr(bp, name) == offset


def test_setup_header_fields_are_contiguous_and_fill_0x1f1_to_0x26c() -> None:
    header_fields = sorted(
        (offset, size)
        for offset, size in DOCUMENTED_OFFSETS.values()
        if bp.SETUP_HEADER_START <= offset < 0x290
    )
    position = bp.SETUP_HEADER_START
    for offset, size in header_fields:
        assert offset == position, f"gap or overlap at {offset:#x}"
        position += size
    assert position == bp.KERNEL_INFO_OFFSET + 4
    # zero-page.rst: e820_table is 0xA00 bytes at 0x2D0
    assert bp.E820_MAX_ENTRIES * bp.E820_ENTRY_SIZE == 0xA00


def _header_image(**fields: int) -> bytearray:
    image = bytearray(0x1000)
    image[bp.JUMP : bp.JUMP + 2] = bytes([0xEB, 0x6A])  # header ends at 0x26C
    for name, value in fields.items():
        _, size = DOCUMENTED_OFFSETS[name]
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]
        struct.pack_into(fmt, image, getattr(bp, name), value)
    return image


def test_setup_header_parse_reads_each_field() -> None:
    image = _header_image(
        SETUP_SECTS=0,
        SYSSIZE=0x1234,
        BOOT_FLAG=0xAA55,
        HEADER=bp.HEADER_MAGIC,
        VERSION=0x020C,
        LOADFLAGS=bp.LOADED_HIGH,
        INITRD_ADDR_MAX=0x37FF_FFFF,
        KERNEL_ALIGNMENT=0x20_0000,
        RELOCATABLE_KERNEL=1,
        XLOADFLAGS=bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G,
        CMDLINE_SIZE=2047,
        PREF_ADDRESS=0x100_0000,
        INIT_SIZE=0x300_0000,
    )
    header = bp.SetupHeader.parse(bytes(image))
    assert header.syssize == 0x1234
    assert header.boot_flag == bp.BOOT_FLAG_MAGIC
    assert header.header_magic == bp.HEADER_MAGIC
    assert header.version == 0x020C and header.version_text == "2.12"
    assert header.initrd_addr_max == 0x37FF_FFFF
    assert header.kernel_alignment == 0x20_0000
    assert header.relocatable_kernel is True
    assert header.xloadflags == bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G
    assert header.cmdline_size == 2047
    assert header.pref_address == 0x100_0000
    assert header.init_size == 0x300_0000
    assert header.end == 0x26C
    # setup_sects 0 means 4: boot sector + 4 sectors
    assert header.setup_size == 5 * 512


def test_setup_header_parse_rejects_short_input() -> None:
    with pytest.raises(ValueError, match="setup header needs"):
        bp.SetupHeader.parse(bytes(0x200))


def test_copy_setup_header_copies_exactly_the_self_described_range() -> None:
    image = bytearray(range(256)) * 16
    image[0x201] = 0x40  # header ends at 0x242
    params = bp.BootParams()
    end = params.copy_setup_header(bytes(image))
    data = params.to_bytes()
    assert end == 0x242
    assert data[0x1F1:0x242] == image[0x1F1:0x242]
    assert data[:0x1F1] == bytes(0x1F1)
    assert data[0x242:] == bytes(len(data) - 0x242)


def test_copy_setup_header_refuses_an_end_past_boot_params_header_area() -> None:
    image = bytearray(0x1000)
    image[0x201] = 0xFF  # would end at 0x301
    with pytest.raises(ValueError, match="setup header end"):
        bp.BootParams().copy_setup_header(bytes(image))


def test_64bit_addresses_split_into_ext_fields() -> None:
    params = bp.BootParams()
    params.cmd_line_ptr = 0x1_2345_6000
    params.ramdisk_image = 0x2_0000_1000
    params.ramdisk_size = 0x1_0000_0200
    params.acpi_rsdp_addr = 0xE0000
    assert params.get(bp.CMD_LINE_PTR, 4) == 0x2345_6000
    assert params.get(bp.EXT_CMD_LINE_PTR, 4) == 0x1
    assert params.get(bp.RAMDISK_IMAGE, 4) == 0x1000
    assert params.get(bp.EXT_RAMDISK_IMAGE, 4) == 0x2
    assert params.get(bp.RAMDISK_SIZE, 4) == 0x200
    assert params.get(bp.EXT_RAMDISK_SIZE, 4) == 0x1
    assert params.get(bp.ACPI_RSDP_ADDR, 8) == 0xE0000
    again = bp.BootParams(params.to_bytes())
    assert (again.cmd_line_ptr, again.ramdisk_image, again.ramdisk_size) == (
        0x1_2345_6000,
        0x2_0000_1000,
        0x1_0000_0200,
    )


def test_set_refuses_values_wider_than_the_field() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        bp.BootParams().set(bp.TYPE_OF_LOADER, 1, 0x100)


def test_e820_table_layout_and_round_trip() -> None:
    entries = [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0x60400, E820Type.RESERVED),
        E820Entry(0x100000, 0x7F00000, E820Type.RAM),
        E820Entry(0x1_0000_0000, 0x4000_0000, E820Type.ACPI),
    ]
    params = bp.BootParams()
    params.set_e820(entries)
    raw = params.to_bytes()
    assert raw[bp.E820_ENTRIES] == 4
    # third entry, read with the documented 20-byte struct boot_e820_entry layout
    assert struct.unpack_from("<QQI", raw, 0x2D0 + 2 * 20) == (0x100000, 0x7F00000, 1)
    assert struct.unpack_from("<QQI", raw, 0x2D0 + 3 * 20) == (0x1_0000_0000, 0x4000_0000, 3)
    assert raw[0x2D0 + 4 * 20 : 0x2D0 + 5 * 20] == bytes(20)
    assert bp.BootParams(raw).e820() == entries


def test_e820_with_more_than_128_entries_is_refused() -> None:
    entries = [E820Entry(i * 0x1000, 0x1000, E820Type.RAM) for i in range(129)]
    with pytest.raises(ConfigError, match=r"129 entries.*at most 128"):
        bp.BootParams().set_e820(entries)
    bp.BootParams().set_e820(entries[:128])


def test_reader_rejects_an_unknown_e820_type() -> None:
    params = bp.BootParams()
    params.set_e820([E820Entry(0, 0x1000, E820Type.RAM)])
    raw = bytearray(params.to_bytes())
    struct.pack_into("<I", raw, 0x2D0 + 16, 99)
    with pytest.raises(ValueError, match="unknown type 99"):
        bp.BootParams(raw).e820()


def test_write_to_and_read_from_guest_memory() -> None:
    memory = GuestMemory.for_size(1 << 20)
    params = bp.BootParams()
    params.set(bp.TYPE_OF_LOADER, 1, 0xFF)
    params.cmd_line_ptr = 0x20000
    params.write_to(memory, 0x7000)
    assert memory.read_u8(0x7000 + bp.TYPE_OF_LOADER) == 0xFF
    assert memory.read_u32(0x7000 + bp.CMD_LINE_PTR) == 0x20000
    assert bp.BootParams.read_from(memory, 0x7000).to_bytes() == params.to_bytes()


def test_protocol_version_text() -> None:
    assert bp.protocol_version_text(0x020F) == "2.15"
    assert bp.protocol_version_text(0x0206) == "2.06"
