"""Linux ``struct boot_params`` (the "zero page") and its embedded ``struct setup_header``.

Offsets are absolute within the 4 KiB zero page, as in Documentation/arch/x86/boot.rst and
zero-page.rst; the setup header sits at the same offsets in the first sectors of a bzImage,
so the same constants parse an image header and a zero page. :class:`BootParams` is a small
typed writer/reader over a 4 KiB buffer: the bzImage loader fills one, tests read one back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from vmscope.arch.x86.e820 import E820Entry, E820Type
from vmscope.errors import ConfigError, GuestMemoryError
from vmscope.memory.guest_memory import GuestMemory

BOOT_PARAMS_SIZE = 0x1000

# -- struct boot_params (fields outside the setup header) ----------------------------------
ACPI_RSDP_ADDR = 0x070  # u64, protocol 2.14+
EXT_RAMDISK_IMAGE = 0x0C0  # u32: bits 63:32 of ramdisk_image
EXT_RAMDISK_SIZE = 0x0C4  # u32: bits 63:32 of ramdisk_size
EXT_CMD_LINE_PTR = 0x0C8  # u32: bits 63:32 of cmd_line_ptr
E820_ENTRIES = 0x1E8  # u8: number of entries in the e820 table
SENTINEL = 0x1EF  # u8: must stay 0 so the kernel does not clear "stale" fields
E820_TABLE = 0x2D0  # struct boot_e820_entry[E820_MAX_ENTRIES]
E820_ENTRY_SIZE = 20  # u64 addr, u64 size, u32 type
E820_MAX_ENTRIES = 128

# -- struct setup_header (also present at these offsets in the bzImage file) ---------------
SETUP_HEADER_START = 0x1F1
SETUP_SECTS = 0x1F1  # u8: size of the real-mode setup in 512-byte sectors (0 means 4)
ROOT_FLAGS = 0x1F2  # u16
SYSSIZE = 0x1F4  # u32: size of the protected-mode code in 16-byte paragraphs
RAM_SIZE = 0x1F8  # u16, obsolete
VID_MODE = 0x1FA  # u16
ROOT_DEV = 0x1FC  # u16
BOOT_FLAG = 0x1FE  # u16: 0xAA55
JUMP = 0x200  # u16: short jmp; its displacement byte (0x201) gives the header's end
HEADER = 0x202  # u32: "HdrS"
VERSION = 0x206  # u16: boot protocol version, major << 8 | minor
REALMODE_SWTCH = 0x208  # u32
START_SYS_SEG = 0x20C  # u16, obsolete
KERNEL_VERSION = 0x20E  # u16: offset of the version string, minus 0x200
TYPE_OF_LOADER = 0x210  # u8
LOADFLAGS = 0x211  # u8
SETUP_MOVE_SIZE = 0x212  # u16
CODE32_START = 0x214  # u32
RAMDISK_IMAGE = 0x218  # u32
RAMDISK_SIZE = 0x21C  # u32
BOOTSECT_KLUDGE = 0x220  # u32, obsolete
HEAP_END_PTR = 0x224  # u16
EXT_LOADER_VER = 0x226  # u8
EXT_LOADER_TYPE = 0x227  # u8
CMD_LINE_PTR = 0x228  # u32
INITRD_ADDR_MAX = 0x22C  # u32: highest address the initrd may occupy (inclusive)
KERNEL_ALIGNMENT = 0x230  # u32
RELOCATABLE_KERNEL = 0x234  # u8
MIN_ALIGNMENT = 0x235  # u8 (log2)
XLOADFLAGS = 0x236  # u16
CMDLINE_SIZE = 0x238  # u32: maximum command-line length, excluding the NUL
HARDWARE_SUBARCH = 0x23C  # u32
HARDWARE_SUBARCH_DATA = 0x240  # u64
PAYLOAD_OFFSET = 0x248  # u32
PAYLOAD_LENGTH = 0x24C  # u32
SETUP_DATA = 0x250  # u64
PREF_ADDRESS = 0x258  # u64
INIT_SIZE = 0x260  # u32: memory the kernel needs from its load address until it runs
HANDOVER_OFFSET = 0x264  # u32
KERNEL_INFO_OFFSET = 0x268  # u32
#: the setup header may not extend past this offset of boot_params (edd_mbr_sig_buffer follows)
SETUP_HEADER_LIMIT = 0x290

BOOT_FLAG_MAGIC = 0xAA55
HEADER_MAGIC = 0x5372_6448  # "HdrS" read as little-endian u32
TYPE_OF_LOADER_UNDEFINED = 0xFF  # "a boot loader without an assigned id"
VID_MODE_NORMAL = 0xFFFF

# loadflags
LOADED_HIGH = 1 << 0  # protected-mode code is loaded at 0x100000 or above
KASLR_FLAG = 1 << 1  # set by the kernel, not the loader
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6  # obsolete; only meaningful for the 32-bit entry point
CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid

# xloadflags
XLF_KERNEL_64 = 1 << 0  # has the 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1  # kernel, boot_params, cmdline and initrd may be above 4 GiB
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

_FIELD_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def protocol_version_text(version: int) -> str:
    """0x020F -> '2.15'."""
    return f"{version >> 8}.{version & 0xFF:02d}"


def setup_header_end(image_start: bytes) -> int:
    """Where the setup header ends: 0x202 plus the jump displacement byte at 0x201."""
    return 0x202 + image_start[JUMP + 1]


@dataclass(frozen=True)
class SetupHeader:
    """The setup-header fields a loader needs, read from a bzImage or a zero page.

    Fields the header's protocol version does not define read as whatever bytes are there
    (the kernel's code); callers check ``version`` before trusting them.
    """

    setup_sects: int
    syssize: int
    vid_mode: int
    boot_flag: int
    header_magic: int
    version: int
    kernel_version_offset: int
    type_of_loader: int
    loadflags: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    heap_end_ptr: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    #: offset one past the header's last byte (0x202 + byte at 0x201)
    end: int

    @classmethod
    def parse(cls, data: bytes) -> SetupHeader:
        """Parse the header from the first bytes of a bzImage or from a zero page.

        ``data`` must reach at least KERNEL_INFO_OFFSET + 4; the caller reports short input.
        """
        if len(data) < KERNEL_INFO_OFFSET + 4:
            raise ValueError(f"setup header needs {KERNEL_INFO_OFFSET + 4} bytes, got {len(data)}")

        def u8(offset: int) -> int:
            return data[offset]

        def u16(offset: int) -> int:
            return int(struct.unpack_from("<H", data, offset)[0])

        def u32(offset: int) -> int:
            return int(struct.unpack_from("<I", data, offset)[0])

        def u64(offset: int) -> int:
            return int(struct.unpack_from("<Q", data, offset)[0])

        return cls(
            setup_sects=u8(SETUP_SECTS),
            syssize=u32(SYSSIZE),
            vid_mode=u16(VID_MODE),
            boot_flag=u16(BOOT_FLAG),
            header_magic=u32(HEADER),
            version=u16(VERSION),
            kernel_version_offset=u16(KERNEL_VERSION),
            type_of_loader=u8(TYPE_OF_LOADER),
            loadflags=u8(LOADFLAGS),
            code32_start=u32(CODE32_START),
            ramdisk_image=u32(RAMDISK_IMAGE),
            ramdisk_size=u32(RAMDISK_SIZE),
            heap_end_ptr=u16(HEAP_END_PTR),
            cmd_line_ptr=u32(CMD_LINE_PTR),
            initrd_addr_max=u32(INITRD_ADDR_MAX),
            kernel_alignment=u32(KERNEL_ALIGNMENT),
            relocatable_kernel=bool(u8(RELOCATABLE_KERNEL)),
            xloadflags=u16(XLOADFLAGS),
            cmdline_size=u32(CMDLINE_SIZE),
            pref_address=u64(PREF_ADDRESS),
            init_size=u32(INIT_SIZE),
            end=setup_header_end(data),
        )

    @property
    def setup_size(self) -> int:
        """Bytes of boot sector plus real-mode setup before the protected-mode kernel."""
        return ((self.setup_sects or 4) + 1) * 512

    @property
    def version_text(self) -> str:
        return protocol_version_text(self.version)


class BootParams:
    """A 4 KiB zero page: typed field access, e820 table, and guest-memory transfer."""

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        if data is None:
            self._data = bytearray(BOOT_PARAMS_SIZE)
        else:
            if len(data) != BOOT_PARAMS_SIZE:
                raise ValueError(f"boot_params is {BOOT_PARAMS_SIZE} bytes, got {len(data)}")
            self._data = bytearray(data)

    # -- raw fields ---------------------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int(struct.unpack_from(_FIELD_FORMATS[size], self._data, offset)[0])

    def set(self, offset: int, size: int, value: int) -> None:
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit the {size}-byte field at {offset:#x}")
        struct.pack_into(_FIELD_FORMATS[size], self._data, offset, value)

    def copy_setup_header(self, image_start: bytes) -> int:
        """Copy the setup header (0x1F1 up to its self-described end) from a kernel image.

        Returns the end offset. The caller has checked the image is long enough.
        """
        end = setup_header_end(image_start)
        if end > SETUP_HEADER_LIMIT or len(image_start) < end:
            raise ValueError(f"setup header end {end:#x} is outside 0x202..{SETUP_HEADER_LIMIT:#x}")
        self._data[SETUP_HEADER_START:end] = image_start[SETUP_HEADER_START:end]
        return end

    @property
    def setup_header(self) -> SetupHeader:
        return SetupHeader.parse(bytes(self._data))

    # -- fields split across the header and the boot_params extension -------------------

    @property
    def cmd_line_ptr(self) -> int:
        return self.get(CMD_LINE_PTR, 4) | self.get(EXT_CMD_LINE_PTR, 4) << 32

    @cmd_line_ptr.setter
    def cmd_line_ptr(self, address: int) -> None:
        self.set(CMD_LINE_PTR, 4, address & 0xFFFF_FFFF)
        self.set(EXT_CMD_LINE_PTR, 4, address >> 32)

    @property
    def ramdisk_image(self) -> int:
        return self.get(RAMDISK_IMAGE, 4) | self.get(EXT_RAMDISK_IMAGE, 4) << 32

    @ramdisk_image.setter
    def ramdisk_image(self, address: int) -> None:
        self.set(RAMDISK_IMAGE, 4, address & 0xFFFF_FFFF)
        self.set(EXT_RAMDISK_IMAGE, 4, address >> 32)

    @property
    def ramdisk_size(self) -> int:
        return self.get(RAMDISK_SIZE, 4) | self.get(EXT_RAMDISK_SIZE, 4) << 32

    @ramdisk_size.setter
    def ramdisk_size(self, size: int) -> None:
        self.set(RAMDISK_SIZE, 4, size & 0xFFFF_FFFF)
        self.set(EXT_RAMDISK_SIZE, 4, size >> 32)

    @property
    def acpi_rsdp_addr(self) -> int:
        return self.get(ACPI_RSDP_ADDR, 8)

    @acpi_rsdp_addr.setter
    def acpi_rsdp_addr(self, address: int) -> None:
        self.set(ACPI_RSDP_ADDR, 8, address)

    # -- e820 ---------------------------------------------------------------------------

    def set_e820(self, entries: Iterable[E820Entry]) -> None:
        table = list(entries)
        if len(table) > E820_MAX_ENTRIES:
            raise ConfigError(
                f"e820 map has {len(table)} entries; boot_params holds at most {E820_MAX_ENTRIES}"
            )
        self._data[E820_TABLE : E820_TABLE + E820_MAX_ENTRIES * E820_ENTRY_SIZE] = bytes(
            E820_MAX_ENTRIES * E820_ENTRY_SIZE
        )
        for index, entry in enumerate(table):
            struct.pack_into(
                "<QQI",
                self._data,
                E820_TABLE + index * E820_ENTRY_SIZE,
                entry.address,
                entry.size,
                entry.type,
            )
        self._data[E820_ENTRIES] = len(table)

    def e820(self) -> list[E820Entry]:
        count = self._data[E820_ENTRIES]
        if count > E820_MAX_ENTRIES:
            raise ValueError(f"e820_entries is {count}, more than {E820_MAX_ENTRIES}")
        entries = []
        for index in range(count):
            address, size, kind = struct.unpack_from("<QQI", self._data, E820_TABLE + index * E820_ENTRY_SIZE)
            try:
                entry_type = E820Type(kind)
            except ValueError:
                raise ValueError(f"e820 entry {index} has unknown type {kind}") from None
            entries.append(E820Entry(address, size, entry_type))
        return entries

    # -- transfer -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return bytes(self._data)

    def write_to(self, memory: GuestMemory, address: int) -> None:
        memory.write(address, self._data)

    @classmethod
    def read_from(cls, memory: GuestMemory, address: int) -> BootParams:
        try:
            return cls(memory.read(address, BOOT_PARAMS_SIZE))
        except GuestMemoryError as error:
            raise GuestMemoryError(f"boot_params at {address:#x}: {error}", address) from None
