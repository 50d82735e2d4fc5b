"""What every loader returns: where the guest starts and what it occupies."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from vmscope.arch.x86.cpu_state import CpuEntryState


class LoadedSegment(NamedTuple):
    """A range of guest-physical memory a loader filled."""

    address: int
    size: int
    description: str


class LoadedGuest:
    """The result of loading a guest image into guest memory."""

    __slots__ = ("entry", "kind", "segments", "symbol_file")

    def __init__(
        self,
        entry: CpuEntryState,
        segments: list[LoadedSegment] | None = None,
        symbol_file: Path | None = None,
        kind: str = "",
    ) -> None:
        #: register state of the boot vCPU (mode, rip, segments, control registers, gprs)
        self.entry = entry
        #: what was written where (kernel segments, boot structures, command line, modules)
        self.segments: list[LoadedSegment] = [] if segments is None else segments
        #: image to read symbols from for crash reports and profiles (None for flat binaries)
        self.symbol_file = symbol_file
        #: a short description for logs ("PVH ELF", "ELF64", "flat (real mode)")
        self.kind = kind
