"""SYSCALL and SYSRET as the architecture defines them (Intel SDM vol. 2B), as pure data.

Why a VMM needs this: a kvm_pvm host runs guest user code natively, and a 64-bit ``syscall``
there lands on the guest's IA32_LSTAR with the registers set as SYSCALL sets them (RCX = the
return address, R11 = RFLAGS) but still at CPL3. Fetching the kernel's entry code at CPL3
faults, so the guest kernel receives a #PF whose frame says: user CS, RIP = CR2 = LSTAR.
:func:`failed_syscall` recognises that frame, and :func:`syscall_entry` gives the state the
SYSCALL should have produced, which the VMM loads instead of letting the #PF run.
:func:`sysret` is the way back, for a host whose emulator cannot execute SYSRET at CPL0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_SYSCALL_MASK = 0xC000_0084
SYSCALL_MSRS = (MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK)

RFLAGS_FIXED = 0x2
RFLAGS_RF = 1 << 16
#: the RFLAGS bits SYSRET loads from R11 (RF, VM and the reserved bits are not loaded)
SYSRET_RFLAGS_MASK = 0x3C_7FD7
_FRAME = struct.Struct("<6Q")
FRAME_WITH_ERROR_CODE_SIZE = _FRAME.size


@dataclass(frozen=True)
class SyscallMsrs:
    star: int
    lstar: int
    fmask: int

    @property
    def kernel_cs(self) -> int:
        return (self.star >> 32) & 0xFFFC

    @property
    def user_base(self) -> int:
        """STAR[63:48]: SYSRET's CS is this + 16 (64-bit) or this (32-bit), SS this + 8."""
        return (self.star >> 48) & 0xFFFF


@dataclass(frozen=True)
class ExceptionFrame:
    """What the CPU pushes for an exception with an error code (a #PF), lowest address first."""

    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    @classmethod
    def unpack(cls, data: bytes) -> ExceptionFrame:
        if len(data) < _FRAME.size:
            raise ValueError(f"an exception frame is {_FRAME.size} bytes, got {len(data)}")
        return cls(*_FRAME.unpack_from(data))


@dataclass(frozen=True)
class Segment:
    """A flat code or data segment as SYSCALL/SYSRET load it (base 0, limit 4 GiB)."""

    selector: int
    dpl: int
    code: bool
    long_mode: bool = False

    @property
    def type(self) -> int:
        return 0xB if self.code else 0x3  # execute/read, accessed | read/write, accessed

    @property
    def default_big(self) -> bool:
        """The D/B bit: set for data and for 32-bit code, clear for 64-bit code."""
        return not (self.code and self.long_mode)


@dataclass(frozen=True)
class ModeSwitch:
    """The state after SYSCALL or SYSRET; general registers not named here are unchanged."""

    rip: int
    rsp: int
    rflags: int
    cs: Segment
    ss: Segment

    @property
    def cpl(self) -> int:
        return self.cs.selector & 3


def failed_syscall(frame: ExceptionFrame, cr2: int, msrs: SyscallMsrs) -> bool:
    """Whether a #PF is a user ``syscall`` that reached LSTAR without leaving CPL3."""
    return frame.cs & 3 == 3 and frame.rip == cr2 == msrs.lstar and msrs.lstar != 0


def syscall_entry(frame: ExceptionFrame, msrs: SyscallMsrs) -> ModeSwitch:
    """The state a 64-bit SYSCALL enters the kernel with, from the #PF frame of a failed one.

    RCX and R11 already hold what SYSCALL saves (the return address and RFLAGS); RSP is still
    the user's (SYSCALL does not switch stacks); RFLAGS is masked by IA32_FMASK.
    """
    cs = msrs.kernel_cs
    rflags = (frame.rflags & ~msrs.fmask & ~RFLAGS_RF & 0xFFFF_FFFF) | RFLAGS_FIXED
    return ModeSwitch(
        rip=msrs.lstar,
        rsp=frame.rsp,
        rflags=rflags,
        cs=Segment(cs, 0, code=True, long_mode=True),
        ss=Segment(cs + 8, 0, code=False),
    )


def is_canonical(address: int) -> bool:
    top = address >> 47
    return top in (0, 0x1FFFF)


def sysret(rcx: int, r11: int, rsp: int, msrs: SyscallMsrs, *, to_64_bit: bool) -> ModeSwitch | None:
    """The state SYSRET (REX.W: back to 64-bit code) returns to user mode with; None where the
    CPU raises #GP(0) instead (a non-canonical return address)."""
    base = msrs.user_base
    if to_64_bit:
        if not is_canonical(rcx):
            return None
        rip, cs = rcx, Segment((base + 16) | 3, 3, code=True, long_mode=True)
    else:
        rip, cs = rcx & 0xFFFF_FFFF, Segment(base | 3, 3, code=True, long_mode=False)
    return ModeSwitch(
        rip=rip,
        rsp=rsp,
        rflags=(r11 & SYSRET_RFLAGS_MASK) | RFLAGS_FIXED,
        cs=cs,
        ss=Segment((base + 8) | 3, 3, code=False),
    )
