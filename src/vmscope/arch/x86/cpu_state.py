"""The architectural register state a vCPU starts in, independent of KVM.

Loaders and mode setup produce a :class:`CpuEntryState`; the KVM layer copies it into
kvm_regs/kvm_sregs. Keeping it plain data lets the boot logic be unit-tested without KVM.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class CpuMode(enum.Enum):
    """The processor mode a guest is entered in."""

    REAL = "real"
    PROTECTED = "protected"  # 32-bit, paging off
    LONG = "long"  # 64-bit, identity-mapped low 4 GiB


class Segment(NamedTuple):
    """A segment register's hidden state, laid out as struct kvm_segment."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the architectural name)
    g: int = 0
    avl: int = 0
    unusable: int = 0


class DescriptorTable(NamedTuple):
    base: int = 0
    limit: int = 0xFFFF


GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip


class CpuEntryState:
    """Everything the boot vCPU needs set before its first KVM_RUN.

    Mutable: mode setup and loaders adjust control registers and ``gprs`` after building it.
    """

    __slots__ = (
        "cr0", "cr3", "cr4", "cs", "ds", "efer", "es", "fs", "gdt", "gprs",
        "gs", "idt", "ldt", "mode", "rflags", "rip", "ss", "tr",
    )  # fmt: skip

    rip: int
    mode: CpuMode
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr3: int
    cr4: int
    efer: int
    rflags: int
    #: general-purpose registers by lower-case name (rsp included), e.g. {"rbx": 0x6000}
    gprs: dict[str, int]

    def __init__(
        self,
        rip: int,
        mode: CpuMode,
        cs: Segment,
        ds: Segment,
        es: Segment,
        fs: Segment,
        gs: Segment,
        ss: Segment,
        tr: Segment,
        ldt: Segment,
        gdt: DescriptorTable,
        idt: DescriptorTable,
        cr0: int = CR0_ET | CR0_NE,
        cr3: int = 0,
        cr4: int = 0,
        efer: int = 0,
        rflags: int = 0x2,
        gprs: dict[str, int] | None = None,
    ) -> None:
        self.rip = rip
        self.mode = mode
        self.cs = cs
        self.ds = ds
        self.es = es
        self.fs = fs
        self.gs = gs
        self.ss = ss
        self.tr = tr
        self.ldt = ldt
        self.gdt = gdt
        self.idt = idt
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.efer = efer
        self.rflags = rflags
        self.gprs = {} if gprs is None else gprs
