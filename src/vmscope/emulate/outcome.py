"""What emulate() returns: the instruction completed, raises an exception, or is unsupported."""

from __future__ import annotations

from dataclasses import dataclass

# exception vectors the emulator raises
DE, DB, BP, UD, NM, GP, PF, MF, XM = 0, 1, 3, 6, 7, 13, 14, 16, 19
VECTOR_NAMES = {
    DE: "#DE", DB: "#DB", BP: "#BP", UD: "#UD", NM: "#NM", GP: "#GP", PF: "#PF", MF: "#MF", XM: "#XM",
}  # fmt: skip


@dataclass(frozen=True)
class Completed:
    """The instruction's effects are written back and rip points past it."""

    mnemonic: str


@dataclass(frozen=True)
class RaiseException:
    """Deliver ``vector`` to the guest. For a trap (#BP) rip already points past the
    instruction; for a fault nothing was changed and rip still points at it."""

    mnemonic: str
    vector: int
    error_code: int | None = None
    #: the faulting linear address for #PF (goes to CR2)
    cr2: int | None = None

    @property
    def name(self) -> str:
        return VECTOR_NAMES.get(self.vector, f"vector {self.vector}")


@dataclass(frozen=True)
class Unsupported:
    """The emulator does not implement this instruction (or this form of it)."""

    mnemonic: str
    reason: str


Outcome = Completed | RaiseException | Unsupported
