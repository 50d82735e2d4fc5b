"""What the fallback emulator needs from a vCPU: the CpuAccess protocol and its faults.

The emulator is pure logic; a VMM adapts a real vCPU to this protocol (vmscope.vmm.fallback)
and unit tests adapt a synthetic register file. Addresses passed to the memory methods are
linear (segment base already added); translating them and checking permissions is the
adapter's job, which reports a refusal as :class:`MemoryFault` with the #PF error code.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

#: the general registers by their 64-bit names, plus rip and rflags
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
REGISTER_NAMES = (*GPR_NAMES, "rip", "rflags")

# page-fault error code bits (Intel SDM vol. 3, 4.7)
PF_PRESENT = 1 << 0
PF_WRITE = 1 << 1
PF_USER = 1 << 2
PF_RESERVED = 1 << 3
PF_FETCH = 1 << 4


class MemoryFault(Exception):
    """A linear access the guest's paging refuses: becomes #PF with CR2 = ``address``."""

    def __init__(self, address: int, error_code: int) -> None:
        super().__init__(f"page fault at {address:#x} (error code {error_code:#x})")
        self.address = address
        self.error_code = error_code


class UnsupportedAccess(Exception):
    """An access the adapter cannot perform (e.g. a memory operand in MMIO space): the
    instruction is reported unsupported rather than guessed at."""


@dataclass(frozen=True)
class ControlState:
    """The parts of the special registers an instruction's meaning depends on."""

    cr0: int
    cr4: int
    efer: int
    #: CS.L and CS.D/B: together with CR0.PE and EFER.LMA they give the code size
    cs_l: bool
    cs_db: bool
    cpl: int
    #: segment register name ("cs", "ds", "es", "fs", "gs", "ss") -> base
    segment_bases: dict[str, int] = field(default_factory=dict)
    cr2: int = 0

    @property
    def code_bits(self) -> int:
        """16, 32 or 64: the default operand/address size of the code being run."""
        if not self.cr0 & 1:
            return 16
        if self.cs_l and self.efer & (1 << 10):
            return 64
        return 32 if self.cs_db else 16


@dataclass(frozen=True)
class XstateComponent:
    """Where one XSAVE state component lives (CPUID leaf 0xD, sub-leaf = component)."""

    offset: int  # in the standard (non-compacted) format
    size: int
    align64: bool = False  # in the compacted format


#: x87 and SSE live in the legacy region; AVX (YMM upper halves) at its architectural offset
DEFAULT_XSTATE_LAYOUT: dict[int, XstateComponent] = {
    2: XstateComponent(offset=576, size=256),
}


class CpuAccess(Protocol):
    """One vCPU as the emulator sees it, at the instruction that failed."""

    def get_register(self, name: str) -> int:
        """A 64-bit general register, ``rip`` or ``rflags`` (see REGISTER_NAMES)."""
        ...

    def set_register(self, name: str, value: int) -> None: ...

    def control_state(self) -> ControlState: ...

    def read_memory(self, linear: int, size: int) -> bytes:
        """Read ``size`` bytes; raises MemoryFault (not-present or protection)."""
        ...

    def write_memory(self, linear: int, data: bytes) -> None:
        """Write; raises MemoryFault before writing anything to a page it refuses."""
        ...

    def check_writable(self, linear: int, size: int) -> None:
        """Raise MemoryFault if a write of ``size`` bytes at ``linear`` would fault."""
        ...

    def get_xsave(self) -> bytes:
        """The vCPU's FPU/SSE/AVX state as KVM_GET_XSAVE's 4 KiB image (standard format)."""
        ...

    def set_xsave(self, image: bytes) -> None: ...

    def get_xcr0(self) -> int: ...

    def set_xcr0(self, value: int) -> None:
        """Load XCR0; raises ValueError when the host refuses the value (becomes #GP)."""
        ...

    def supported_xcr0(self) -> int:
        """The XCR0 bits the virtual CPU supports (CPUID leaf 0xD EDX:EAX)."""
        ...

    def xstate_layout(self) -> dict[int, XstateComponent]:
        """Offsets and sizes of the extended components (2 and up) the CPU has."""
        ...

    def exclusive(self) -> AbstractContextManager[None]:
        """Held around a locked read-modify-write of guest memory (cmpxchg8b/16b).

        An adapter makes this exclusive against every other vCPU that could touch the same
        memory (a machine-wide lock, or pausing the others); the emulator only brackets.
        """
        ...

    def random_bytes(self, count: int) -> bytes:
        """Entropy for rdrand/rdseed (os.getrandom in the VMM)."""
        ...
