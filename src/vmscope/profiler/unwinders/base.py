"""What every unwinder shares: the register state it walks, the guest-memory reader, the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: reads one 8-byte little-endian guest-virtual word; None when unmapped or outside RAM
WordReader = Callable[[int], "int | None"]
#: reads ``length`` bytes at a guest-virtual address; None when any page is unmapped
BytesReader = Callable[[int, int], "bytes | None"]

STOP_END = "end of stack"
STOP_DEPTH = "depth limit"
STOP_NO_TABLE = "no unwind info"
STOP_UNDEFINED = "undefined frame"
STOP_BAD_READ = "unreadable stack"
STOP_BAD_FRAME = "bad frame"
STOP_USER = "user mode"


@dataclass(slots=True)
class Registers:
    """The registers an unwinder needs, for one frame."""

    ip: int
    sp: int
    bp: int
    #: CPL of the code at ``ip`` (from CS of a pt_regs/iret frame when crossing one)
    cpl: int = 0


@dataclass(frozen=True, slots=True)
class UnwindResult:
    """Return addresses leaf first (``frames[0]`` is the sampled ip), who produced them, why it stopped.

    ``user`` holds the user-mode registers when the walk crossed an interrupt/exception/syscall frame
    from user space, so the caller can continue with a user-space unwinder.
    """

    frames: tuple[int, ...]
    unwinder: str
    stop: str
    user: Registers | None = None
