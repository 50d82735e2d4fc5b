"""SYSCALL/SYSRET semantics for repairing a kvm_pvm host's user-mode syscall (emulate.syscall)."""

from __future__ import annotations

import struct

import pytest

from vmscope.emulate.syscall import (
    ExceptionFrame,
    SyscallMsrs,
    failed_syscall,
    is_canonical,
    syscall_entry,
    sysret,
)

# Linux's values: STAR[63:48] = __USER32_CS (0x23), STAR[47:32] = __KERNEL_CS (0x10)
LINUX = SyscallMsrs(star=(0x0023 << 48) | (0x0010 << 32), lstar=0xFFFF_FFFF_8180_0080, fmask=0x47700)
USER_CS, USER_SS = 0x33, 0x2B


def frame(
    rip: int = LINUX.lstar, cs: int = USER_CS, rflags: int = 0x246, rsp: int = 0x7FFE_0000_1000
) -> ExceptionFrame:
    return ExceptionFrame(error_code=0x15, rip=rip, cs=cs, rflags=rflags, rsp=rsp, ss=USER_SS)


def test_frame_unpacks_in_push_order_and_rejects_short_data() -> None:
    data = struct.pack("<6Q", 0x15, LINUX.lstar, USER_CS, 0x246, 0x7000, USER_SS)
    assert ExceptionFrame.unpack(data) == frame(rsp=0x7000)
    with pytest.raises(ValueError, match="48 bytes"):
        ExceptionFrame.unpack(data[:40])


@pytest.mark.parametrize(
    ("candidate", "cr2", "expected"),
    [
        (frame(), LINUX.lstar, True),
        (frame(cs=0x10), LINUX.lstar, False),  # a kernel-mode fault on the entry is not a syscall
        (frame(rip=0x4000), LINUX.lstar, False),  # an ordinary user fault touching the entry page
        (frame(), LINUX.lstar + 8, False),  # the fault is about another address
        (frame(rip=0xFFFF_FFFF_8100_0000), 0xFFFF_FFFF_8100_0000, False),  # a jump to other kernel code
    ],
)
def test_only_a_user_fetch_fault_on_lstar_is_a_failed_syscall(
    candidate: ExceptionFrame, cr2: int, expected: bool
) -> None:
    assert failed_syscall(candidate, cr2, LINUX) is expected
    assert not failed_syscall(candidate, cr2, SyscallMsrs(LINUX.star, 0, LINUX.fmask)) or not expected


def test_syscall_entry_is_cpl0_at_lstar_with_kernel_segments_and_masked_flags() -> None:
    switch = syscall_entry(frame(rflags=0x10246 | 0x100 | 0x400), LINUX)  # RF, TF, DF set in user mode
    assert (switch.rip, switch.rsp, switch.cpl) == (LINUX.lstar, 0x7FFE_0000_1000, 0)
    assert switch.rflags == 0x46 | 0x2  # IF, TF, DF, AC, NT, IOPL cleared by FMASK; RF cleared
    assert (switch.cs.selector, switch.cs.long_mode, switch.cs.default_big) == (0x10, True, False)
    assert (switch.ss.selector, switch.ss.code, switch.ss.dpl) == (0x18, False, 0)


def test_sysret_to_64_bit_code_loads_user_segments_and_r11_flags() -> None:
    switch = sysret(rcx=0x40_1000, r11=0x246 | 0x10000 | 0x20000, rsp=0x7FF0, msrs=LINUX, to_64_bit=True)
    assert switch is not None
    assert (switch.rip, switch.rsp, switch.cpl) == (0x40_1000, 0x7FF0, 3)
    assert switch.rflags == 0x246  # RF and VM are not restored
    assert (switch.cs.selector, switch.ss.selector) == (0x33, 0x2B)
    assert switch.cs.long_mode and switch.cs.dpl == 3


def test_sysret_to_32_bit_code_and_the_non_canonical_return() -> None:
    compat = sysret(rcx=0xDEAD_0000_4000_1000, r11=0x202, rsp=0x1000, msrs=LINUX, to_64_bit=False)
    assert compat is not None
    assert compat.rip == 0x4000_1000 and compat.cs.selector == 0x23 and not compat.cs.long_mode
    assert sysret(rcx=0x0000_8000_0000_0000, r11=0x202, rsp=0, msrs=LINUX, to_64_bit=True) is None
    assert is_canonical(0xFFFF_8000_0000_0000) and not is_canonical(0x0001_0000_0000_0000)
