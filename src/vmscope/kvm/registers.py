"""KVM's register sets as plain ``{name: int}`` dicts: the one place that reads them field by field.

Used by the Python API (``Machine.get_registers``), the control socket, the GDB stub and crash
reports, each with the names and order it shows.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmscope.kvm import structs as s

#: kvm_regs in its own order: rax..r15 (rsp before rbp, as KVM lays them out), rip, rflags
GENERAL_REGISTERS: tuple[str, ...] = tuple(field[0] for field in s.kvm_regs._fields_)
SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss")
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def general_registers(regs: s.kvm_regs, names: Iterable[str] = GENERAL_REGISTERS) -> dict[str, int]:
    """``names`` (default: every field, in KVM's order) from ``kvm_regs``."""
    return {name: int(getattr(regs, name)) for name in names}


def control_registers(sregs: s.kvm_sregs, names: Iterable[str] = CONTROL_REGISTERS) -> dict[str, int]:
    """Control registers, EFER and the APIC base (or the ``names`` given) from ``kvm_sregs``."""
    return {name: int(getattr(sregs, name)) for name in names}


def segment_selectors(sregs: s.kvm_sregs, names: Iterable[str] = SEGMENT_REGISTERS) -> dict[str, int]:
    """The selector of each segment register in ``names``."""
    return {name: int(getattr(sregs, name).selector) for name in names}


def register_dict(regs: s.kvm_regs, sregs: s.kvm_sregs) -> dict[str, int]:
    """General registers, rip, rflags, control registers and segment selectors of one vCPU."""
    return general_registers(regs) | control_registers(sregs) | segment_selectors(sregs)
