"""Loading a loader-produced boot state (:class:`CpuEntryState`, plain data from arch/x86) into a
KVM vCPU. It lives here, not in kvm/, because the KVM binding sits below arch in the layering
and knows only its own structures."""

from __future__ import annotations

from vmscope.arch.x86.cpu_state import CpuEntryState, DescriptorTable, Segment
from vmscope.kvm import Vcpu
from vmscope.kvm import structs as s


def _to_kvm_segment(segment: Segment) -> s.kvm_segment:
    return s.kvm_segment(
        base=segment.base,
        limit=segment.limit,
        selector=segment.selector,
        type=segment.type,
        present=segment.present,
        dpl=segment.dpl,
        db=segment.db,
        s=segment.s,
        l=segment.l,
        g=segment.g,
        avl=segment.avl,
        unusable=segment.unusable,
    )


def _to_kvm_dtable(table: DescriptorTable) -> s.kvm_dtable:
    return s.kvm_dtable(base=table.base, limit=table.limit)


def apply_entry_state(vcpu: Vcpu, state: CpuEntryState) -> None:
    """Segments, control registers, rip, rflags and general registers of ``state``, and the
    x87/SSE control words of a reset CPU."""
    sregs = vcpu.get_sregs()  # keeps apic_base and the interrupt bitmap as KVM set them
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        setattr(sregs, name, _to_kvm_segment(getattr(state, name)))
    sregs.gdt = _to_kvm_dtable(state.gdt)
    sregs.idt = _to_kvm_dtable(state.idt)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = s.kvm_regs()
    for name, value in state.gprs.items():
        setattr(regs, name, value)
    regs.rip = state.rip
    regs.rflags = state.rflags
    vcpu.set_regs(regs)
    # a zero MXCSR would mask no SSE exception: start as a reset CPU does
    fpu = s.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
