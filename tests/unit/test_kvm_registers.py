"""The one reader of KVM register sets into plain dicts."""

from __future__ import annotations

from vmscope.kvm import structs
from vmscope.kvm.registers import (
    GENERAL_REGISTERS,
    control_registers,
    general_registers,
    register_dict,
    segment_selectors,
)


def sample() -> tuple[structs.kvm_regs, structs.kvm_sregs]:
    regs, sregs = structs.kvm_regs(), structs.kvm_sregs()
    for index, name in enumerate(GENERAL_REGISTERS):
        setattr(regs, name, 0x1000 + index)
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8 = 0x8000_0011, 0xDEAD, 0x5000, 0x20, 3
    sregs.efer, sregs.apic_base = 0x500, 0xFEE0_0900
    for index, name in enumerate(("cs", "ds", "es", "fs", "gs", "ss")):
        getattr(sregs, name).selector = 8 * (index + 1)
    return regs, sregs


def test_general_registers_follow_kvm_order_unless_names_are_given() -> None:
    regs, _ = sample()
    values = general_registers(regs)
    assert list(values)[:8] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"]
    assert values["rip"] == 0x1000 + GENERAL_REGISTERS.index("rip")
    assert list(general_registers(regs, ("rbp", "rsp"))) == ["rbp", "rsp"]


def test_register_dict_has_everything_the_api_reports() -> None:
    regs, sregs = sample()
    values = register_dict(regs, sregs)
    assert values["cr2"] == 0xDEAD and values["apic_base"] == 0xFEE0_0900 and values["efer"] == 0x500
    assert values["ss"] == 48 and values["cs"] == 8
    assert set(values) == set(GENERAL_REGISTERS) | set(control_registers(sregs)) | set(
        segment_selectors(sregs)
    )
