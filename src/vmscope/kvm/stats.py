"""KVM's binary statistics (KVM_GET_STATS_FD): the kernel's own per-VM and per-vCPU counters.

Read with pread so a reader never disturbs the vCPU threads. Histogram statistics come back
as lists of bucket counts, everything else as one integer.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

from vmscope.kvm import structs as s

STATS_TYPE_MASK = 0xF
STATS_TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear-hist", 4: "log-hist"}
STATS_UNITS = {0: "", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}


class StatDescriptor(NamedTuple):
    name: str
    kind: str
    unit: str
    exponent: int
    size: int
    offset: int


class BinaryStats:
    """A parsed stats file descriptor: descriptors are read once, values on every read()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        header = s.kvm_stats_header.from_buffer_copy(os.pread(fd, ctypes.sizeof(s.kvm_stats_header), 0))
        self.id = os.pread(fd, header.name_size, header.id_offset).rstrip(b"\0").decode(errors="replace")
        self._data_offset = header.data_offset
        fixed = ctypes.sizeof(s.kvm_stats_desc)
        stride = fixed + header.name_size
        raw = os.pread(fd, stride * header.num_desc, header.desc_offset)
        self.descriptors: list[StatDescriptor] = []
        for index in range(header.num_desc):
            chunk = raw[index * stride : (index + 1) * stride]
            desc = s.kvm_stats_desc.from_buffer_copy(chunk[:fixed])
            name = chunk[fixed:].split(b"\0", 1)[0].decode(errors="replace")
            self.descriptors.append(
                StatDescriptor(
                    name=name,
                    kind=STATS_TYPES.get(desc.flags & STATS_TYPE_MASK, "unknown"),
                    unit=STATS_UNITS.get((desc.flags >> 4) & 0xF, ""),
                    exponent=desc.exponent,
                    size=desc.size,
                    offset=desc.offset,
                )
            )
        self._data_size = max((d.offset + d.size * 8 for d in self.descriptors), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """Current values by statistic name."""
        data = os.pread(self.fd, self._data_size, self._data_offset)
        values: dict[str, int | list[int]] = {}
        for desc in self.descriptors:
            words = [
                int.from_bytes(data[desc.offset + 8 * i : desc.offset + 8 * i + 8], "little")
                for i in range(desc.size)
            ]
            values[desc.name] = words[0] if desc.size == 1 else words
        return values

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
