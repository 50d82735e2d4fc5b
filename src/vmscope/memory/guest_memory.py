"""Guest RAM: the one object that owns the host mapping and checks every access.

Everything that touches guest memory (loaders, devices, the profiler's stack unwinder)
goes through :class:`GuestMemory`, so a guest-chosen address can never make the VMM read
or write host memory outside the RAM it mapped. An access that is not wholly inside one
region raises :class:`GuestMemoryError`.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from vmscope.errors import ConfigError, GuestMemoryError

log = logging.getLogger("vmscope.memory")

#: a transparent huge page on x86-64
HUGE_PAGE_SIZE = 2 << 20

# x86 keeps 0xC0000000-0xFFFFFFFF for MMIO (PCI holes, LAPIC, IOAPIC); RAM above it
# continues at 4 GiB, as on PCs and in QEMU's q35/microvm.
MMIO_HOLE_START = 0xC000_0000
HIGH_RAM_START = 0x1_0000_0000

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MemoryRegion(NamedTuple):
    """A contiguous range of guest-physical RAM backed by one host mapping."""

    guest_base: int
    size: int
    mapping: mmap.mmap
    host_address: int
    slot: int

    @property
    def guest_end(self) -> int:
        return self.guest_base + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.guest_base <= gpa and gpa + length <= self.guest_end


def parse_size(text: str) -> int:
    """Parse '256M', '1G', '65536', '4K' into bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if value and value[-1] in units:
        scale = units[value[-1]]
        value = value[:-1]
    try:
        number = int(value, 0)
    except ValueError:
        raise ConfigError(
            f"invalid size {text!r}: expected a number with an optional K, M or G suffix"
        ) from None
    if number <= 0:
        raise ConfigError(f"invalid size {text!r}: must be positive")
    return number * scale


def host_memory_bytes() -> int:
    """Physical RAM of this host (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def check_fits_host(size: int, host_bytes: int | None = None) -> None:
    """Refuse guest RAM larger than the host's: it could only end in the OOM killer mid-run."""
    host = host_memory_bytes() if host_bytes is None else host_bytes
    if host and size > host:
        raise ConfigError(
            f"--mem {_format_size(size)} is more than this host's {_format_size(host)} of RAM; "
            "give a smaller --mem"
        )


def _format_size(size: int) -> str:
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.4g}{unit}"
    return str(size)


def _advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages behind guest RAM, as QEMU does (``MADV_HUGEPAGE``).

    KVM can then map the guest with 2 MiB pages where the host backs it with them (fewer
    guest TLB misses and page-table levels on VT-x/AMD-V hosts). Best effort: where THP is
    off or unsupported nothing changes.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or len(mapping) < HUGE_PAGE_SIZE:
        return
    try:
        mapping.madvise(advice)
    except OSError as error:
        log.debug("MADV_HUGEPAGE refused for guest RAM: %s", error)


class GuestMemory:
    """Guest-physical RAM split around the x86 MMIO hole, with bounds-checked access."""

    def __init__(self, regions: Sequence[tuple[int, int]], *, backing_fd: int | None = None) -> None:
        """Map host memory for each (guest_base, size) pair: anonymous, or with ``backing_fd``
        a private copy-on-write mapping of that file, the regions one after another in it.

        A private file mapping reads a page from the file only when it is first touched and
        never writes back: a snapshot's RAM file becomes guest RAM without reading all of it.
        """
        self._regions: list[MemoryRegion] = []
        file_offset = 0
        for slot, (base, size) in enumerate(sorted(regions)):
            if size <= 0 or size % mmap.PAGESIZE or base % mmap.PAGESIZE:
                raise ConfigError(f"memory region {base:#x}+{size:#x} is not page aligned")
            if self._regions and base < self._regions[-1].guest_end:
                raise ConfigError(f"memory region {base:#x}+{size:#x} overlaps another")
            try:
                if backing_fd is None:
                    anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
                    mapping = mmap.mmap(-1, size, flags=anonymous)
                    _advise_huge_pages(mapping)
                else:
                    mapping = mmap.mmap(
                        backing_fd,
                        size,
                        flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0),
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=file_offset,
                    )
                    file_offset += size
            except OSError as error:
                self.close()
                raise ConfigError(
                    f"guest memory: cannot map {size >> 20} MiB at {base:#x} ({error.strerror or error}); "
                    "give a smaller --mem"
                ) from None
            host_address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            self._regions.append(MemoryRegion(base, size, mapping, host_address, slot))
        if not self._regions:
            raise ConfigError("guest memory needs at least one region")
        # The common case is a single low region; keep a direct reference for speed.
        self._low = self._regions[0]

    @classmethod
    def for_size(cls, size: int, *, backing_fd: int | None = None) -> GuestMemory:
        """Lay out ``size`` bytes of RAM the way a PC does: below the hole, rest above 4 GiB."""
        if size < 1 << 20:
            raise ConfigError(f"guest memory of {size} bytes is too small: give at least 1M")
        size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        low = min(size, MMIO_HOLE_START)
        regions = [(0, low)]
        if size > low:
            regions.append((HIGH_RAM_START, size - low))
        return cls(regions, backing_fd=backing_fd)

    @classmethod
    def from_private_file(cls, path: str | os.PathLike[str], size: int) -> GuestMemory:
        """``size`` bytes of RAM laid out as :meth:`for_size`, mapped privately and lazily from
        ``path`` (the regions' contents one after another; a snapshot's RAM file)."""
        with open(path, "rb") as file:
            actual = os.fstat(file.fileno()).st_size
            if actual != size:
                raise ConfigError(f"{path}: RAM file is {actual} bytes, expected {size}")
            return cls.for_size(size, backing_fd=file.fileno())  # the mappings outlive the fd

    # -- layout -------------------------------------------------------------------------

    @property
    def regions(self) -> Sequence[MemoryRegion]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        """Total RAM in bytes."""
        return sum(r.size for r in self._regions)

    @property
    def low_size(self) -> int:
        """RAM below the 32-bit MMIO hole, in bytes."""
        return self._low.size

    def ranges(self) -> Iterator[tuple[int, int]]:
        """(guest_base, size) for each RAM region, in address order."""
        for region in self._regions:
            yield region.guest_base, region.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.contains(gpa, length) for r in self._regions)

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        low = self._low
        if low.guest_base <= gpa and gpa + length <= low.guest_end and length >= 0:
            return low, gpa - low.guest_base
        for region in self._regions:
            if region.contains(gpa, length) and length >= 0:
                return region, gpa - region.guest_base
        raise GuestMemoryError(
            f"guest-physical access {gpa:#x}+{length:#x} is outside guest RAM", address=gpa
        )

    # -- access -------------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of guest RAM; the range must lie inside one region."""
        region, offset = self._locate(gpa, length)
        return memoryview(region.mapping)[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self._locate(gpa, length)
        return region.mapping[offset : offset + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._locate(gpa, len(data))
        region.mapping[offset : offset + len(data)] = bytes(data) if isinstance(data, memoryview) else data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        region, offset = self._locate(gpa, length)
        region.mapping[offset : offset + length] = bytes([byte]) * length

    def read_u8(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 1)
        return region.mapping[offset]

    def read_u16(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 2)
        return int(_U16.unpack_from(region.mapping, offset)[0])

    def read_u32(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 4)
        return int(_U32.unpack_from(region.mapping, offset)[0])

    def read_u64(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 8)
        return int(_U64.unpack_from(region.mapping, offset)[0])

    def write_u8(self, gpa: int, value: int) -> None:
        region, offset = self._locate(gpa, 1)
        region.mapping[offset] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        region, offset = self._locate(gpa, 2)
        _U16.pack_into(region.mapping, offset, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        region, offset = self._locate(gpa, 4)
        _U32.pack_into(region.mapping, offset, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        region, offset = self._locate(gpa, 8)
        _U64.pack_into(region.mapping, offset, value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_cstring(self, gpa: int, max_length: int = 4096) -> bytes:
        """Read a NUL-terminated string, stopping at max_length or the end of the region."""
        region, offset = self._locate(gpa, 1)
        end = min(region.size, offset + max_length)
        chunk = region.mapping[offset:end]
        nul = chunk.find(b"\0")
        return chunk if nul < 0 else chunk[:nul]

    def close(self) -> None:
        for region in self._regions:
            try:
                region.mapping.close()
            except BufferError:
                # ctypes still references the buffer (memslot address); the mapping goes with the process.
                pass
