"""Load a Linux bzImage by the x86 boot protocol's 64-bit entry (Documentation/arch/x86/boot.rst).

Only the protected-mode part of the image is loaded; the real-mode setup code never runs,
because the VMM does its job: it fills ``struct boot_params`` (the zero page) itself and
enters the kernel in long mode at load address + 0x200 with %rsi pointing at the zero page.

Guest-physical placement:

* zero page at ``ZERO_PAGE_ADDRESS`` (0x7000), command line at ``CMDLINE_ADDRESS`` (0x20000);
* the kernel at the header's ``pref_address``. A kernel that gives no usable preferred address
  loads at 16 MiB (rounded up to ``kernel_alignment``) when relocatable, else at 1 MiB. The range
  [load address, load address + init_size) is reserved for the kernel's in-place decompression
  and must lie in guest RAM;
* the initrd page-aligned as high as possible below min(initrd_addr_max + 1, end of low RAM), in
  RAM at or above 1 MiB, clear of the kernel's init_size range and of any non-RAM range passed in
  ``extra_e820``. If no free range can hold it, loading fails with the sizes: the initrd is never
  truncated or silently moved somewhere the kernel would not accept.

The initrd is never placed above 4 GiB even when the kernel sets XLF_CAN_BE_LOADED_ABOVE_4G:
low RAM runs up to 3 GiB, which is ample, and the boot page tables only map the low 4 GiB.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vmscope.arch.x86 import boot_params as bp
from vmscope.arch.x86.e820 import E820Entry, E820Type, build_e820
from vmscope.arch.x86.layout import CMDLINE_ADDRESS, CMDLINE_MAX_SIZE, HIGH_MEMORY_START, ZERO_PAGE_ADDRESS
from vmscope.arch.x86.modes import long_mode_state
from vmscope.errors import ConfigError, ImageFormatError
from vmscope.loader.base import LoadedGuest, LoadedSegment
from vmscope.loader.elf import load_elf_segments, physical_entry, read_elf_image
from vmscope.loader.kernel_payload import bzimage_vmlinux
from vmscope.memory.guest_memory import GuestMemory

#: protocol 2.06 added cmdline_size; anything older cannot describe a 64-bit entry at all
MIN_PROTOCOL_VERSION = 0x0206
#: the 64-bit entry point's offset from the start of the protected-mode kernel
ENTRY_64_OFFSET = 0x200
#: load address for a relocatable kernel that names no preferred address (Linux's default
#: CONFIG_PHYSICAL_START)
DEFAULT_RELOCATABLE_LOAD_ADDRESS = 16 << 20
PAGE_SIZE = 0x1000
#: bytes read to parse the header: the boot sector and the setup header, with room to spare
HEADER_READ_SIZE = 0x4000
#: the real-mode setup never runs; heap_end_ptr describes the conventional setup + heap of
#: 0xE000 bytes (its end minus 0x200, as boot.rst specifies) for any code that looks at it
HEAP_END_PTR = 0xE000 - 0x200

# LoadedSegment descriptions start with these words so callers can find each placement.
SEGMENT_KERNEL = "bzImage kernel"
SEGMENT_ZERO_PAGE = "boot_params"
SEGMENT_CMDLINE = "command line"
SEGMENT_INITRD = "initrd"


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def _read_start(path: Path) -> bytes:
    try:
        with path.open("rb") as image:
            return image.read(HEADER_READ_SIZE)
    except OSError as error:
        raise ImageFormatError(str(path), f"cannot read: {error.strerror}") from None


def read_bzimage_header(path: Path) -> bp.SetupHeader:
    """Parse and validate the setup header of the bzImage at ``path``.

    Raises :class:`ImageFormatError` for anything the 64-bit boot protocol cannot load: a file
    too short for a header, a missing 0xAA55 boot flag or "HdrS" magic, protocol older than
    2.06, no 64-bit entry (XLF_KERNEL_64), not loaded high, or a header whose fields disagree.
    """
    data = _read_start(path)
    name = str(path)
    if len(data) < bp.KERNEL_INFO_OFFSET + 4:
        raise ImageFormatError(
            name, f"truncated: {len(data)} bytes is too short for a bzImage setup header "
            f"(needs at least {bp.KERNEL_INFO_OFFSET + 4})"
        )  # fmt: skip
    header = bp.SetupHeader.parse(data)
    if header.boot_flag != bp.BOOT_FLAG_MAGIC:
        raise ImageFormatError(
            name, f"not a bzImage: boot flag at 0x1fe is {header.boot_flag:#06x}, expected 0xaa55"
        )
    if header.header_magic != bp.HEADER_MAGIC:
        found = data[bp.HEADER : bp.HEADER + 4]
        raise ImageFormatError(name, f"not a bzImage: no 'HdrS' magic at 0x202 (found {found!r})")
    if header.version < MIN_PROTOCOL_VERSION:
        raise ImageFormatError(
            name,
            f"boot protocol {header.version_text} is too old: vmscope needs 2.06 or later "
            "(a kernel with a 64-bit entry point, protocol 2.12+)",
        )
    if not header.xloadflags & bp.XLF_KERNEL_64:
        raise ImageFormatError(
            name,
            f"kernel (boot protocol {header.version_text}) has no 64-bit entry point "
            f"(XLF_KERNEL_64 clear in xloadflags {header.xloadflags:#x}); a 32-bit kernel cannot be booted",
        )
    if not header.loadflags & bp.LOADED_HIGH:
        raise ImageFormatError(name, "not a bzImage: LOADED_HIGH is clear in loadflags (a zImage loads low)")
    if header.end > bp.SETUP_HEADER_LIMIT or header.end < bp.INIT_SIZE + 4:
        raise ImageFormatError(
            name, f"setup header end {header.end:#x} (0x202 + byte at 0x201) is outside "
            f"{bp.INIT_SIZE + 4:#x}..{bp.SETUP_HEADER_LIMIT:#x}"
        )  # fmt: skip
    if header.syssize == 0:
        raise ImageFormatError(name, "setup header says the protected-mode kernel is empty (syssize 0)")
    if header.relocatable_kernel and (
        header.kernel_alignment == 0 or header.kernel_alignment & (header.kernel_alignment - 1)
    ):
        raise ImageFormatError(name, f"kernel_alignment {header.kernel_alignment:#x} is not a power of two")
    if header.init_size == 0:
        raise ImageFormatError(name, "setup header has init_size 0")
    file_size = path.stat().st_size
    kernel_bytes = header.syssize * 16
    if file_size < header.setup_size + kernel_bytes:
        raise ImageFormatError(
            name,
            f"truncated: setup ({header.setup_size} bytes) plus kernel (syssize {header.syssize} x 16 = "
            f"{kernel_bytes} bytes) needs {header.setup_size + kernel_bytes} bytes, file has {file_size}",
        )
    return header


def is_bzimage(path: Path) -> bool:
    """True when ``path`` starts with a bzImage setup header (boot flag and "HdrS" magic).

    Says nothing about whether the kernel is loadable; :func:`load_bzimage` reports that.
    """
    try:
        with Path(path).open("rb") as image:
            start = image.read(bp.HEADER + 4)
    except OSError:
        return False
    return (
        len(start) == bp.HEADER + 4
        and start[bp.BOOT_FLAG : bp.BOOT_FLAG + 2] == b"\x55\xaa"
        and start[bp.HEADER : bp.HEADER + 4] == b"HdrS"
    )


def kernel_version_string(path: Path) -> str:
    """The version string the header points at ("6.1.0-... (builder) #1 SMP ..."), or ""."""
    header = read_bzimage_header(path)
    offset = header.kernel_version_offset + 0x200
    if header.kernel_version_offset == 0 or offset >= header.setup_size:
        return ""
    with path.open("rb") as image:
        image.seek(offset)
        text = image.read(min(256, header.setup_size - offset))
    return text.split(b"\0", 1)[0].decode("ascii", "replace")


def kernel_load_address(header: bp.SetupHeader) -> int:
    """Where the protected-mode kernel goes (policy in the module docstring)."""
    preferred = header.pref_address
    alignment = header.kernel_alignment if header.relocatable_kernel else 1
    if preferred >= HIGH_MEMORY_START and (not header.relocatable_kernel or preferred % alignment == 0):
        return preferred
    if header.relocatable_kernel:
        return _align_up(DEFAULT_RELOCATABLE_LOAD_ADDRESS, max(alignment, 1 << 20))
    return HIGH_MEMORY_START


def merge_e820(base: Sequence[E820Entry], extra: Sequence[E820Entry]) -> list[E820Entry]:
    """``base`` with each ``extra`` entry laid over it: where they overlap, ``extra`` wins.

    The result is sorted, has no overlaps, and joins adjacent entries of the same type.
    """
    entries = list(base)
    for overlay in extra:
        if overlay.size <= 0:
            continue
        carved: list[E820Entry] = []
        for entry in entries:
            if entry.end <= overlay.address or overlay.end <= entry.address:
                carved.append(entry)
                continue
            if entry.address < overlay.address:
                carved.append(E820Entry(entry.address, overlay.address - entry.address, entry.type))
            if overlay.end < entry.end:
                carved.append(E820Entry(overlay.end, entry.end - overlay.end, entry.type))
        carved.append(overlay)
        entries = carved
    merged: list[E820Entry] = []
    for entry in sorted(entries, key=lambda e: e.address):
        if merged and merged[-1].type == entry.type and merged[-1].end == entry.address:
            merged[-1] = E820Entry(merged[-1].address, merged[-1].size + entry.size, entry.type)
        else:
            merged.append(entry)
    return merged


def _free_ranges(start: int, end: int, busy: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sub-ranges of [start, end) not covered by any busy [a, b)."""
    free = [(start, end)]
    for busy_start, busy_end in busy:
        next_free = []
        for free_start, free_end in free:
            if busy_end <= free_start or free_end <= busy_start:
                next_free.append((free_start, free_end))
                continue
            if free_start < busy_start:
                next_free.append((free_start, busy_start))
            if busy_end < free_end:
                next_free.append((busy_end, free_end))
        free = next_free
    return free


def place_initrd(
    size: int,
    *,
    initrd_addr_max: int,
    low_ram_end: int,
    kernel_range: tuple[int, int],
    reserved: Sequence[tuple[int, int]] = (),
    name: str = "initrd",
) -> int:
    """The highest page-aligned address for ``size`` bytes of initrd (policy in the module docstring)."""
    limit = min(initrd_addr_max + 1, low_ram_end)
    free = _free_ranges(HIGH_MEMORY_START, limit, [kernel_range, *reserved])
    best: int | None = None
    for free_start, free_end in free:
        candidate = _align_down(free_end - size, PAGE_SIZE)
        if candidate >= _align_up(free_start, PAGE_SIZE) and (best is None or candidate > best):
            best = candidate
    if best is None:
        room = max((end - _align_up(start, PAGE_SIZE) for start, end in free), default=0)
        raise ImageFormatError(
            name,
            f"initrd of {size} bytes does not fit: the largest free range below {limit:#x} "
            f"(min of initrd_addr_max {initrd_addr_max:#x} + 1 and end of low RAM {low_ram_end:#x}), "
            f"outside the kernel's {kernel_range[0]:#x}-{kernel_range[1]:#x}, holds {max(room, 0)} bytes; "
            "give the guest more memory or use a smaller initrd",
        )
    return best


def _low_ram_end(memory: GuestMemory) -> int:
    base, size = next(iter(memory.ranges()))
    return base + size


def _load_file(memory: GuestMemory, path: Path, file_offset: int, address: int, length: int) -> None:
    """Read ``length`` bytes of ``path`` from ``file_offset`` straight into guest RAM."""
    target = memory.view(address, length)
    try:
        with path.open("rb") as source:
            source.seek(file_offset)
            done = 0
            while done < length:
                count = source.readinto(target[done:])
                if not count:
                    raise ImageFormatError(str(path), f"file ended after {done} of {length} bytes")
                done += count
    except OSError as error:
        raise ImageFormatError(str(path), f"cannot read: {error.strerror}") from None
    finally:
        target.release()


def _load_vmlinux(memory: GuestMemory, path: Path, kernel_range: tuple[int, int]) -> int:
    """Copy the bzImage's decompressed vmlinux to its link-time physical addresses; its entry.

    The kernel is not relocated, so every segment must sit where it was linked, inside the
    range the boot protocol reserves for the kernel (load address + init_size).
    """
    vmlinux = bzimage_vmlinux(path)
    with tempfile.NamedTemporaryFile(prefix="vmscope-vmlinux-") as unpacked:
        unpacked.write(vmlinux)
        unpacked.flush()
        image = read_elf_image(Path(unpacked.name))
        start, end = kernel_range
        for segment in image.segments:
            if not (start <= segment.paddr and segment.paddr + segment.memsz <= end):
                raise ImageFormatError(
                    str(path),
                    f"its vmlinux segment {segment.index} is linked at {segment.paddr:#x}+"
                    f"{segment.memsz:#x}, outside the kernel's range {start:#x}-{end:#x}: "
                    "boot it with --decompress guest",
                )
        load_elf_segments(memory, image)
        entry = physical_entry(image, image.entry, virtual=False)
    if entry is None:
        raise ImageFormatError(str(path), f"its vmlinux entry point {image.entry:#x} lies in no segment")
    return entry


def load_bzimage(
    memory: GuestMemory,
    path: Path,
    cmdline: str = "",
    initrd: Path | None = None,
    rsdp_address: int = 0,
    extra_e820: Sequence[E820Entry] = (),
    *,
    decompress_on_host: bool = False,
) -> LoadedGuest:
    """Load the bzImage at ``path`` for a 64-bit boot and fill the zero page.

    ``rsdp_address`` (non-zero) is passed as boot_params.acpi_rsdp_addr; ``extra_e820``
    entries are laid over the RAM map from :func:`build_e820` (e.g. ACPI table ranges).
    Returns the long-mode entry state (rip = load address + 0x200, rsi = zero page) and a
    LoadedSegment for the kernel (its init_size range), boot_params, command line and initrd.

    ``decompress_on_host``: decompress the payload here and enter the vmlinux at its own 64-bit
    entry (startup_64) with the same zero page, as the kernel's decompressor would have done at
    its end. It skips the decompressor, which software virtualization runs as minutes of
    emulated CPL0 code, and with it the decompressor's KASLR (the kernel runs where it was linked).
    """
    path = Path(path)
    name = str(path)
    header = read_bzimage_header(path)
    image_start = _read_start(path)
    low_ram_end = _low_ram_end(memory)

    # -- kernel ------------------------------------------------------------------------
    load_address = kernel_load_address(header)
    kernel_bytes = header.syssize * 16
    reserved_size = max(header.init_size, kernel_bytes)
    if not memory.contains(load_address, reserved_size):
        needed_mib = (load_address + reserved_size + (1 << 20) - 1) >> 20
        raise ImageFormatError(
            name,
            f"kernel needs {reserved_size} bytes (init_size) from its load address {load_address:#x}, "
            f"up to {load_address + reserved_size:#x}, but guest RAM below the MMIO hole ends at "
            f"{low_ram_end:#x}; give the guest at least {needed_mib}M",
        )
    kernel_range = (load_address, load_address + reserved_size)
    if decompress_on_host:
        entry_rip = _load_vmlinux(memory, path, kernel_range)
        how = "decompressed by vmscope, entered at startup_64"
    else:
        _load_file(memory, path, header.setup_size, load_address, kernel_bytes)
        entry_rip = load_address + ENTRY_64_OFFSET
        how = "64-bit entry"

    # -- command line --------------------------------------------------------------------
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise ConfigError("kernel command line contains a NUL byte")
    accepted = min(header.cmdline_size, CMDLINE_MAX_SIZE - 1)
    if len(encoded) > accepted:
        raise ConfigError(
            f"kernel command line is {len(encoded)} bytes; {name} accepts at most {header.cmdline_size}"
            + (f" and vmscope's buffer {CMDLINE_MAX_SIZE - 1}" if accepted < header.cmdline_size else "")
        )
    memory.write(CMDLINE_ADDRESS, encoded + b"\0")

    # -- initrd --------------------------------------------------------------------------
    initrd_address = initrd_size = 0
    if initrd is not None:
        initrd = Path(initrd)
        try:
            initrd_size = initrd.stat().st_size
        except OSError as error:
            raise ImageFormatError(str(initrd), f"cannot read initrd: {error.strerror}") from None
        if initrd_size == 0:
            raise ImageFormatError(str(initrd), "initrd is empty")
        non_ram = [(e.address, e.end) for e in extra_e820 if e.type != E820Type.RAM]
        initrd_address = place_initrd(
            initrd_size,
            initrd_addr_max=header.initrd_addr_max,
            low_ram_end=low_ram_end,
            kernel_range=kernel_range,
            reserved=non_ram,
            name=str(initrd),
        )
        _load_file(memory, initrd, 0, initrd_address, initrd_size)

    # -- zero page -----------------------------------------------------------------------
    params = bp.BootParams()
    params.copy_setup_header(image_start)
    params.set(bp.TYPE_OF_LOADER, 1, bp.TYPE_OF_LOADER_UNDEFINED)
    # KEEP_SEGMENTS only concerns the 32-bit entry point (and is obsolete), so it stays clear.
    params.set(bp.LOADFLAGS, 1, (header.loadflags | bp.LOADED_HIGH | bp.CAN_USE_HEAP) & ~bp.KEEP_SEGMENTS)
    params.set(bp.HEAP_END_PTR, 2, HEAP_END_PTR)
    params.set(bp.VID_MODE, 2, bp.VID_MODE_NORMAL)
    params.set(bp.CODE32_START, 4, load_address)
    params.cmd_line_ptr = CMDLINE_ADDRESS
    params.ramdisk_image = initrd_address
    params.ramdisk_size = initrd_size
    if rsdp_address:
        params.acpi_rsdp_addr = rsdp_address
    params.set_e820(merge_e820(build_e820(memory), extra_e820))
    params.write_to(memory, ZERO_PAGE_ADDRESS)

    entry = long_mode_state(memory, entry_rip)
    entry.gprs["rsi"] = ZERO_PAGE_ADDRESS

    segments = [
        LoadedSegment(
            load_address,
            reserved_size,
            f"{SEGMENT_KERNEL} {path.name} ({kernel_bytes} bytes loaded, init_size {header.init_size})",
        ),
        LoadedSegment(ZERO_PAGE_ADDRESS, bp.BOOT_PARAMS_SIZE, f"{SEGMENT_ZERO_PAGE} (zero page)"),
        LoadedSegment(CMDLINE_ADDRESS, len(encoded) + 1, f"{SEGMENT_CMDLINE} ({len(encoded)} bytes)"),
    ]
    if initrd is not None:
        segments.append(LoadedSegment(initrd_address, initrd_size, f"{SEGMENT_INITRD} {os.fspath(initrd)}"))
    return LoadedGuest(
        entry=entry,
        segments=segments,
        symbol_file=None,
        kind=f"bzImage (boot protocol {header.version_text}, {how})",
    )
