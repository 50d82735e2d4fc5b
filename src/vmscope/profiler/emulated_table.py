"""The "Emulated by vmscope" table: instructions the host's KVM could not emulate that vmscope's
fallback emulator completed, as plain rows for the terminal report, ``vmscope stat`` and HTML.

One row per (mnemonic, guest rip), summed over vCPUs unless one vCPU is asked for, with the
function it lies in when the profile's symbol tables know it. The share of run time is the
emulator's time over the vCPUs' wall time (run duration times vCPUs): what completing these
instructions in Python cost the guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmscope.profiler.analysis import format_ns, format_pct
from vmscope.profiler.model import Profile
from vmscope.symbols import Symbolizer

TITLE = "Emulated by vmscope"
HEADERS = ["Instruction", "Guest rip", "Symbol", "Count", "Total", "Mean"]


@dataclass(slots=True)
class EmulatedRow:
    mnemonic: str
    rip: int
    #: ``function+0xoffset``, or None when no symbol table covers ``rip``
    symbol: str | None
    count: int
    total_ns: int

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


def emulated_rows(profile: Profile, vcpu: int | None = None) -> list[EmulatedRow]:
    """Rows by (mnemonic, rip), most completions first."""
    merged: dict[tuple[str, int], EmulatedRow] = {}
    symbolizer: Symbolizer | None = None
    for entry in profile.emulated:
        if vcpu is not None and entry.vcpu != vcpu:
            continue
        row = merged.get((entry.mnemonic, entry.rip))
        if row is None:
            if symbolizer is None:
                symbolizer = profile.symbolizer()
            symbol = symbolizer.name_and_offset(entry.rip)
            row = merged[(entry.mnemonic, entry.rip)] = EmulatedRow(entry.mnemonic, entry.rip, symbol, 0, 0)
        row.count += entry.count
        row.total_ns += entry.total_ns
    return sorted(merged.values(), key=lambda row: (-row.count, -row.total_ns, row.rip, row.mnemonic))


def emulated_summary(profile: Profile, rows: list[EmulatedRow], vcpu: int | None = None) -> str:
    """One line: how many, how long, and the share of the vCPUs' run time."""
    count = sum(row.count for row in rows)
    total = sum(row.total_ns for row in rows)
    vcpus = 1 if vcpu is not None else max(1, profile.metadata.cpus)
    wall = profile.metadata.duration_ns * vcpus
    share = f", {format_pct(100.0 * total / wall)} of the vCPUs' run time" if wall else ""
    return f"{count} instructions KVM could not emulate completed by vmscope in {format_ns(total)}{share}"


def emulated_table(
    profile: Profile, vcpu: int | None = None, limit: int | None = None
) -> tuple[list[str], list[list[str]], str]:
    """Headers, formatted rows (the first ``limit``) and the summary line; no rows when the
    fallback emulator completed nothing (or the profile predates it)."""
    rows = emulated_rows(profile, vcpu)
    cells = [
        [
            row.mnemonic,
            f"{row.rip:#x}",
            row.symbol or "-",
            str(row.count),
            format_ns(row.total_ns),
            format_ns(row.mean_ns),
        ]
        for row in rows[:limit]
    ]
    return list(HEADERS), cells, emulated_summary(profile, rows, vcpu) if rows else ""
