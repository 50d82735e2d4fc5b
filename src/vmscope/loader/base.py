"""What every loader returns: where the guest starts and what it occupies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmscope.arch.x86.cpu_state import CpuEntryState


@dataclass(frozen=True)
class LoadedSegment:
    """A range of guest-physical memory a loader filled."""

    address: int
    size: int
    description: str


@dataclass
class LoadedGuest:
    """The result of loading a guest image into guest memory."""

    #: register state of the boot vCPU (mode, rip, segments, control registers, gprs)
    entry: CpuEntryState
    #: what was written where (kernel segments, boot structures, command line, modules)
    segments: list[LoadedSegment] = field(default_factory=list)
    #: image to read symbols from for crash reports and profiles (None for flat binaries)
    symbol_file: Path | None = None
    #: a short description for logs ("PVH ELF", "ELF64", "flat (real mode)")
    kind: str = ""
