"""bzImage header validation, placement of kernel/cmdline/initrd and the zero page it fills."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from vmscope.arch.x86 import boot_params as bp
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.arch.x86.e820 import E820Entry, E820Type, build_e820
from vmscope.arch.x86.layout import CMDLINE_ADDRESS, ZERO_PAGE_ADDRESS
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader import bzimage
from vmscope.loader.base import LoadedGuest, LoadedSegment
from vmscope.memory.guest_memory import GuestMemory

# tests/ holds the kernel download helper shared with the KVM boot test
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

from kernel_fixture import debian_kernel

MIB = 1 << 20
SETUP_SECTS = 4
SETUP_SIZE = (SETUP_SECTS + 1) * 512


def make_bzimage(
    directory: Path,
    *,
    name: str = "bzImage",
    payload: bytes | None = None,
    version: int = 0x020F,
    xloadflags: int = bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G,
    loadflags: int = bp.LOADED_HIGH,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
    pref_address: int = 16 * MIB,
    init_size: int = 8 * MIB,
    relocatable: bool = True,
    kernel_alignment: int = 2 * MIB,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    header_end: int = 0x26C,
    syssize: int | None = None,
    after_header: bytes = b"\xee\xee\xee\xee",
) -> Path:
    """A fake bzImage: a boot sector + setup header, setup sectors, then the payload."""
    if payload is None:
        payload = bytes((i * 7 + 3) & 0xFF for i in range(64 * 1024))
    setup = bytearray(SETUP_SIZE)
    struct.pack_into("<B", setup, bp.SETUP_SECTS, SETUP_SECTS)
    struct.pack_into("<H", setup, bp.ROOT_FLAGS, 1)
    struct.pack_into("<I", setup, bp.SYSSIZE, syssize if syssize is not None else (len(payload) + 15) // 16)
    struct.pack_into("<H", setup, bp.VID_MODE, 0xFFFD)
    struct.pack_into("<H", setup, bp.BOOT_FLAG, boot_flag)
    setup[bp.JUMP : bp.JUMP + 2] = bytes([0xEB, header_end - 0x202])
    setup[bp.HEADER : bp.HEADER + 4] = magic
    struct.pack_into("<H", setup, bp.VERSION, version)
    struct.pack_into("<H", setup, bp.KERNEL_VERSION, 0x300 - 0x200)
    setup[0x300:0x310] = b"6.99-test (t)\0\0\0"
    struct.pack_into("<B", setup, bp.LOADFLAGS, loadflags)
    struct.pack_into("<I", setup, bp.CODE32_START, 0x100000)
    struct.pack_into("<I", setup, bp.INITRD_ADDR_MAX, initrd_addr_max)
    struct.pack_into("<I", setup, bp.KERNEL_ALIGNMENT, kernel_alignment)
    struct.pack_into("<B", setup, bp.RELOCATABLE_KERNEL, int(relocatable))
    struct.pack_into("<H", setup, bp.XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, bp.CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", setup, bp.PREF_ADDRESS, pref_address)
    struct.pack_into("<I", setup, bp.INIT_SIZE, init_size)
    setup[header_end : header_end + len(after_header)] = after_header
    path = directory / name
    path.write_bytes(bytes(setup) + payload)
    return path


def segment(loaded: LoadedGuest, prefix: str) -> LoadedSegment:
    matches = [s for s in loaded.segments if s.description.startswith(prefix)]
    assert len(matches) == 1, loaded.segments
    return matches[0]


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.for_size(64 * MIB)


# -- header validation -------------------------------------------------------------------------


def test_header_of_a_valid_image(tmp_path: Path) -> None:
    header = bzimage.read_bzimage_header(make_bzimage(tmp_path))
    assert header.version_text == "2.15"
    assert header.xloadflags & bp.XLF_KERNEL_64
    assert header.setup_size == SETUP_SIZE
    assert bzimage.kernel_version_string(make_bzimage(tmp_path)) == "6.99-test (t)"


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(make_bzimage(tmp_path).read_bytes()[:0x220])
    with pytest.raises(ImageFormatError, match="truncated: 544 bytes"):
        bzimage.load_bzimage(GuestMemory.for_size(64 * MIB), path)


def test_payload_shorter_than_syssize_is_refused(tmp_path: Path) -> None:
    path = make_bzimage(tmp_path, payload=bytes(4096), syssize=4096 // 16 + 1)
    with pytest.raises(ImageFormatError, match=r"truncated: .*syssize 257.*file has"):
        bzimage.read_bzimage_header(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"boot_flag": 0x1234}, "boot flag at 0x1fe is 0x1234, expected 0xaa55"),
        ({"magic": b"XXXX"}, "no 'HdrS' magic at 0x202"),
        ({"version": 0x0205}, "boot protocol 2.05 is too old.*2.06"),
        ({"version": 0x0204}, "boot protocol 2.04 is too old"),
        ({"xloadflags": bp.XLF_CAN_BE_LOADED_ABOVE_4G}, "no 64-bit entry point .*XLF_KERNEL_64"),
        ({"loadflags": 0}, "LOADED_HIGH is clear"),
        ({"header_end": 0x250}, "setup header end 0x250"),
        ({"syssize": 0}, "syssize 0"),
        ({"init_size": 0}, "init_size 0"),
        ({"kernel_alignment": 3 * MIB}, "kernel_alignment 0x300000 is not a power of two"),
    ],
)
def test_malformed_headers_give_clear_errors(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    path = make_bzimage(tmp_path, **options)  # type: ignore[arg-type]
    with pytest.raises(ImageFormatError, match=message) as caught:
        bzimage.load_bzimage(GuestMemory.for_size(64 * MIB), path)
    assert caught.value.path == str(path)


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="cannot read"):
        bzimage.read_bzimage_header(tmp_path / "absent")


def test_is_bzimage(tmp_path: Path) -> None:
    assert bzimage.is_bzimage(make_bzimage(tmp_path))
    # detection does not judge loadability: an old-protocol image is still a bzImage
    assert bzimage.is_bzimage(make_bzimage(tmp_path, name="old", version=0x0204))
    assert not bzimage.is_bzimage(make_bzimage(tmp_path, name="nomagic", magic=b"HdrX"))
    elf = tmp_path / "elf"
    elf.write_bytes(b"\x7fELF" + bytes(2000))
    assert not bzimage.is_bzimage(elf)
    short = tmp_path / "short"
    short.write_bytes(b"\x55\xaa")
    assert not bzimage.is_bzimage(short)
    assert not bzimage.is_bzimage(tmp_path / "absent")


# -- kernel placement and entry state ---------------------------------------------------------


def test_kernel_is_loaded_at_pref_address_and_entered_in_long_mode(
    tmp_path: Path, memory: GuestMemory
) -> None:
    payload = bytes((i * 13 + 5) & 0xFF for i in range(48 * 1024))
    path = make_bzimage(tmp_path, payload=payload, pref_address=18 * MIB, init_size=6 * MIB)
    loaded = bzimage.load_bzimage(memory, path)
    assert memory.read(18 * MIB, len(payload)) == payload
    kernel = segment(loaded, bzimage.SEGMENT_KERNEL)
    assert (kernel.address, kernel.size) == (18 * MIB, 6 * MIB)
    entry = loaded.entry
    assert entry.mode is CpuMode.LONG
    assert entry.rip == 18 * MIB + 0x200
    assert entry.gprs["rsi"] == ZERO_PAGE_ADDRESS
    # boot protocol: __BOOT_CS = 0x10 and __BOOT_DS = 0x18, flat 4 GiB segments
    assert entry.cs.selector == 0x10 and entry.cs.l == 1
    assert entry.ds.selector == entry.ss.selector == entry.es.selector == 0x18
    assert entry.cr3 != 0
    assert loaded.symbol_file is None
    assert "2.15" in loaded.kind


def test_relocatable_kernel_without_preferred_address_loads_at_16_mib(
    tmp_path: Path, memory: GuestMemory
) -> None:
    path = make_bzimage(tmp_path, pref_address=0)
    loaded = bzimage.load_bzimage(memory, path)
    assert segment(loaded, bzimage.SEGMENT_KERNEL).address == 16 * MIB
    assert loaded.entry.rip == 16 * MIB + 0x200


def test_relocatable_default_respects_a_larger_kernel_alignment(tmp_path: Path) -> None:
    header = bzimage.read_bzimage_header(make_bzimage(tmp_path, pref_address=0, kernel_alignment=32 * MIB))
    assert bzimage.kernel_load_address(header) == 32 * MIB


def test_non_relocatable_kernel_without_preferred_address_loads_at_1_mib(tmp_path: Path) -> None:
    header = bzimage.read_bzimage_header(make_bzimage(tmp_path, pref_address=0, relocatable=False))
    assert bzimage.kernel_load_address(header) == MIB


def test_kernel_whose_init_size_exceeds_ram_is_refused(tmp_path: Path) -> None:
    path = make_bzimage(tmp_path, init_size=60 * MIB)
    with pytest.raises(ImageFormatError, match=r"needs 62914560 bytes \(init_size\).*at least 76M"):
        bzimage.load_bzimage(GuestMemory.for_size(64 * MIB), path)


# -- zero page ---------------------------------------------------------------------------------


def test_zero_page_contents(tmp_path: Path, memory: GuestMemory) -> None:
    path = make_bzimage(tmp_path, after_header=b"\xee" * 8)
    image = path.read_bytes()
    bzimage.load_bzimage(memory, path, cmdline="console=ttyS0", rsdp_address=0xE0000)
    raw = memory.read(ZERO_PAGE_ADDRESS, bp.BOOT_PARAMS_SIZE)
    params = bp.BootParams(raw)
    header = params.setup_header
    # the header is copied from the image; fields the loader owns are then overwritten
    assert raw[bp.SYSSIZE : bp.SYSSIZE + 4] == image[bp.SYSSIZE : bp.SYSSIZE + 4]
    assert raw[bp.PREF_ADDRESS : bp.INIT_SIZE + 4] == image[bp.PREF_ADDRESS : bp.INIT_SIZE + 4]
    assert raw[bp.HEADER : bp.HEADER + 4] == b"HdrS"
    # nothing past the header's end (0x26C) comes from the image
    assert raw[0x26C:0x274] == bytes(8)
    assert header.type_of_loader == 0xFF
    assert header.loadflags & bp.LOADED_HIGH
    assert header.loadflags & bp.CAN_USE_HEAP
    assert not header.loadflags & bp.KEEP_SEGMENTS
    assert header.heap_end_ptr == bzimage.HEAP_END_PTR
    assert header.vid_mode == 0xFFFF
    assert header.code32_start == 16 * MIB
    assert params.cmd_line_ptr == CMDLINE_ADDRESS
    assert memory.read_cstring(CMDLINE_ADDRESS) == b"console=ttyS0"
    assert params.acpi_rsdp_addr == 0xE0000
    assert (params.ramdisk_image, params.ramdisk_size) == (0, 0)
    assert raw[bp.SENTINEL] == 0
    assert params.e820() == build_e820(memory)


def test_no_rsdp_address_leaves_the_field_zero(tmp_path: Path, memory: GuestMemory) -> None:
    bzimage.load_bzimage(memory, make_bzimage(tmp_path))
    assert bp.BootParams.read_from(memory, ZERO_PAGE_ADDRESS).acpi_rsdp_addr == 0


def test_extra_e820_entries_are_laid_over_the_ram_map(tmp_path: Path, memory: GuestMemory) -> None:
    extra = [
        E820Entry(0xE0000, 0x1000, E820Type.ACPI),
        E820Entry(40 * MIB, 0x10000, E820Type.RESERVED),
    ]
    bzimage.load_bzimage(memory, make_bzimage(tmp_path), extra_e820=extra)
    table = bp.BootParams.read_from(memory, ZERO_PAGE_ADDRESS).e820()
    assert table == [
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(0x9FC00, 0xE0000 - 0x9FC00, E820Type.RESERVED),
        E820Entry(0xE0000, 0x1000, E820Type.ACPI),
        E820Entry(0xE1000, 0x100000 - 0xE1000, E820Type.RESERVED),
        E820Entry(MIB, 40 * MIB - MIB, E820Type.RAM),
        E820Entry(40 * MIB, 0x10000, E820Type.RESERVED),
        E820Entry(40 * MIB + 0x10000, 64 * MIB - 40 * MIB - 0x10000, E820Type.RAM),
    ]
    for before, after in itertools.pairwise(table):
        assert before.end <= after.address


def test_merge_e820_joins_adjacent_entries_of_one_type() -> None:
    merged = bzimage.merge_e820(
        [E820Entry(0, 0x1000, E820Type.RAM)],
        [E820Entry(0x1000, 0x1000, E820Type.RAM), E820Entry(0x800, 0x100, E820Type.RESERVED)],
    )
    assert merged == [
        E820Entry(0, 0x800, E820Type.RAM),
        E820Entry(0x800, 0x100, E820Type.RESERVED),
        E820Entry(0x900, 0x1700, E820Type.RAM),
    ]


# -- command line ------------------------------------------------------------------------------


def test_command_line_at_the_limit_is_accepted_and_one_more_byte_refused(
    tmp_path: Path, memory: GuestMemory
) -> None:
    path = make_bzimage(tmp_path, cmdline_size=64)
    loaded = bzimage.load_bzimage(memory, path, cmdline="x" * 64)
    assert memory.read_cstring(CMDLINE_ADDRESS) == b"x" * 64
    assert segment(loaded, bzimage.SEGMENT_CMDLINE).size == 65
    with pytest.raises(ConfigError, match=r"command line is 65 bytes; .* accepts at most 64"):
        bzimage.load_bzimage(memory, path, cmdline="x" * 65)


def test_command_line_longer_than_the_vmm_buffer_is_refused(tmp_path: Path, memory: GuestMemory) -> None:
    path = make_bzimage(tmp_path, cmdline_size=0x100000)
    with pytest.raises(ConfigError, match="command line is 70000 bytes"):
        bzimage.load_bzimage(memory, path, cmdline="y" * 70000)


# -- initrd ------------------------------------------------------------------------------------


def _initrd(tmp_path: Path, size: int, name: str = "initrd.img") -> Path:
    path = tmp_path / name
    pattern = bytes((i * 31 + 1) & 0xFF for i in range(4099))  # period not a power of two
    path.write_bytes((pattern * (size // len(pattern) + 1))[:size])
    return path


def test_initrd_goes_page_aligned_at_the_top_of_low_ram(tmp_path: Path, memory: GuestMemory) -> None:
    initrd = _initrd(tmp_path, 300_001)
    loaded = bzimage.load_bzimage(memory, make_bzimage(tmp_path), initrd=initrd)
    placed = segment(loaded, bzimage.SEGMENT_INITRD)
    assert placed.size == 300_001
    assert placed.address % 4096 == 0
    assert placed.address + placed.size <= 64 * MIB
    assert placed.address + 4096 + placed.size > 64 * MIB  # as high as possible
    assert memory.read(placed.address, placed.size) == initrd.read_bytes()
    params = bp.BootParams.read_from(memory, ZERO_PAGE_ADDRESS)
    assert (params.ramdisk_image, params.ramdisk_size) == (placed.address, 300_001)


def test_initrd_respects_initrd_addr_max(tmp_path: Path, memory: GuestMemory) -> None:
    limit = 30 * MIB - 1  # the highest byte the initrd may occupy
    path = make_bzimage(tmp_path, initrd_addr_max=limit, init_size=4 * MIB)
    placed = segment(
        bzimage.load_bzimage(memory, path, initrd=_initrd(tmp_path, 2 * MIB + 5)), bzimage.SEGMENT_INITRD
    )
    assert placed.address + placed.size - 1 <= limit
    assert placed.address == (30 * MIB - (2 * MIB + 5)) // 4096 * 4096


def test_initrd_goes_below_the_kernel_when_above_is_too_small(tmp_path: Path, memory: GuestMemory) -> None:
    # kernel occupies 16..56 MiB, leaving 8 MiB above and 15 MiB below
    path = make_bzimage(tmp_path, init_size=40 * MIB)
    placed = segment(
        bzimage.load_bzimage(memory, path, initrd=_initrd(tmp_path, 10 * MIB)), bzimage.SEGMENT_INITRD
    )
    assert placed.address == 6 * MIB
    assert placed.address + placed.size <= 16 * MIB


def test_initrd_never_overlaps_reserved_e820_ranges(tmp_path: Path, memory: GuestMemory) -> None:
    reserved = E820Entry(63 * MIB, MIB, E820Type.RESERVED)
    placed = segment(
        bzimage.load_bzimage(
            memory, make_bzimage(tmp_path), initrd=_initrd(tmp_path, 4096), extra_e820=[reserved]
        ),
        bzimage.SEGMENT_INITRD,
    )
    assert placed.address + placed.size <= 63 * MIB


def test_initrd_too_big_is_reported_with_sizes(tmp_path: Path, memory: GuestMemory) -> None:
    path = make_bzimage(tmp_path, init_size=40 * MIB)
    initrd = _initrd(tmp_path, 16 * MIB, name="huge.cpio.gz")
    with pytest.raises(ImageFormatError) as caught:
        bzimage.load_bzimage(memory, path, initrd=initrd)
    message = str(caught.value)
    assert "huge.cpio.gz" in message
    assert f"initrd of {16 * MIB} bytes does not fit" in message
    assert f"holds {15 * MIB} bytes" in message  # 1 MiB..16 MiB is the largest free range


def test_empty_or_missing_initrd_is_refused(tmp_path: Path, memory: GuestMemory) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ImageFormatError, match="initrd is empty"):
        bzimage.load_bzimage(memory, make_bzimage(tmp_path), initrd=empty)
    with pytest.raises(ImageFormatError, match="cannot read initrd"):
        bzimage.load_bzimage(memory, make_bzimage(tmp_path), initrd=tmp_path / "absent")


def test_place_initrd_directly() -> None:
    address = bzimage.place_initrd(
        0x1800, initrd_addr_max=0xFFFF_FFFF, low_ram_end=8 * MIB, kernel_range=(2 * MIB, 4 * MIB)
    )
    assert address == 8 * MIB - 0x2000
    with pytest.raises(ImageFormatError, match="initrd of 7340032 bytes"):
        bzimage.place_initrd(
            7 * MIB, initrd_addr_max=0xFFFF_FFFF, low_ram_end=8 * MIB, kernel_range=(2 * MIB, 4 * MIB)
        )


# -- the real Debian kernel ------------------------------------------------------------------


@pytest.mark.slow
def test_debian_cloud_kernel_header_and_placement(tmp_path: Path) -> None:
    kernel, reason = debian_kernel()
    if kernel is None:
        pytest.skip(reason)
    header = bzimage.read_bzimage_header(kernel)
    assert header.version >= 0x0206
    assert header.xloadflags & bp.XLF_KERNEL_64
    assert header.relocatable_kernel
    assert bzimage.kernel_version_string(kernel)

    memory = GuestMemory.for_size(256 * MIB)
    initrd = _initrd(tmp_path, 3 * MIB + 17)
    loaded = bzimage.load_bzimage(memory, kernel, cmdline="console=ttyS0 panic=-1", initrd=initrd)
    kernel_segment = segment(loaded, bzimage.SEGMENT_KERNEL)
    initrd_segment = segment(loaded, bzimage.SEGMENT_INITRD)
    assert kernel_segment.address == header.pref_address
    assert kernel_segment.size == header.init_size
    assert loaded.entry.rip == header.pref_address + 0x200
    assert (
        initrd_segment.address >= kernel_segment.address + kernel_segment.size
        or initrd_segment.address + initrd_segment.size <= kernel_segment.address
    )
    assert initrd_segment.address + initrd_segment.size - 1 <= header.initrd_addr_max
    with kernel.open("rb") as image:
        image.seek(header.setup_size)
        assert memory.read(kernel_segment.address, 4096) == image.read(4096)
    params = bp.BootParams.read_from(memory, ZERO_PAGE_ADDRESS)
    assert params.setup_header.version == header.version
    assert params.ramdisk_image == initrd_segment.address
    assert memory.read_cstring(params.cmd_line_ptr) == b"console=ttyS0 panic=-1"
