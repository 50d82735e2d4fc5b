"""What the user sees when a guest crashes: reason, registers, the faulting instruction.

The instruction is read from guest memory through the guest's page tables (or taken from
the bytes KVM reports for an emulation failure), disassembled with capstone in the vCPU's
current mode, and symbolized when the guest image has symbols. On hosts whose KVM cannot
emulate some instructions (PVM), the report says whether vmscope's fallback emulator could not
complete it either, and how to steer a guest away from the feature: on a kvm_pvm host CPUID
masking does not reach the guest (it reads the host CPU's CPUID), so the hint names the Linux
``clearcpuid=`` option; on other hosts the --cpu-features mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmscope.errors import GuestMemoryError
from vmscope.kvm import structs as s
from vmscope.kvm.registers import control_registers, general_registers, segment_selectors
from vmscope.memory.guest_memory import GuestMemory
from vmscope.memory.paging import PagingMode, read_virtual

#: instruction mnemonic -> CPUID feature whose absence makes a guest avoid it
FEATURE_FOR_MNEMONIC = {
    "cmpxchg16b": "cx16",
    "xsave": "xsave",
    "xsaveopt": "xsave",
    "xsavec": "xsave",
    "xsaves": "xsave",
    "xrstor": "xsave",
    "xrstors": "xsave",
    "xgetbv": "xsave",
    "xsetbv": "xsave",
    "rdrand": "rdrand",
    "rdseed": "rdseed",
    "rdpid": "rdpid",
    "rdtscp": "rdtscp",
    "rdfsbase": "fsgsbase",
    "rdgsbase": "fsgsbase",
    "wrfsbase": "fsgsbase",
    "wrgsbase": "fsgsbase",
    "invpcid": "invpcid",
    "movbe": "movbe",
    "clflushopt": "clflushopt",
    "clwb": "clwb",
    "popcnt": "popcnt",
}

GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")  # fmt: skip


@dataclass
class CrashReport:
    vcpu_id: int
    reason: str
    registers: dict[str, int] = field(default_factory=dict)
    control: dict[str, int] = field(default_factory=dict)
    mode: str = ""
    cpl: int = 0
    instruction: str | None = None
    instruction_bytes: bytes = b""
    symbol: str | None = None
    hint: str | None = None
    backend: str = ""

    def format(self) -> str:
        lines = [f"guest crashed on vCPU {self.vcpu_id}: {self.reason}"]
        rip = self.registers.get("rip")
        if rip is not None:
            where = f"  at rip {rip:#018x} ({self.mode}, CPL {self.cpl})"
            if self.symbol:
                where += f" in {self.symbol}"
            lines.append(where)
        if self.instruction:
            lines.append(f"  faulting instruction: {self.instruction}  [{self.instruction_bytes.hex(' ')}]")
        elif self.instruction_bytes:
            lines.append(f"  instruction bytes: {self.instruction_bytes.hex(' ')}")
        names = [n for n in GPR_ORDER if n in self.registers]
        for start in range(0, len(names), 4):
            lines.append(
                "  " + "  ".join(f"{n:>6}={self.registers[n]:016x}" for n in names[start : start + 4])
            )
        if self.control:
            lines.append("  " + "  ".join(f"{n}={v:#x}" for n, v in self.control.items()))
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def cpu_mode_name(sregs: s.kvm_sregs) -> tuple[str, int]:
    """Readable mode and capstone mode for the vCPU's current code segment."""
    import capstone  # only crash reports need it; keep it out of start-up

    if not sregs.cr0 & 1:
        return "real mode", capstone.CS_MODE_16
    if sregs.cs.l:
        return "64-bit mode", capstone.CS_MODE_64
    if sregs.cs.db:
        return "32-bit protected mode", capstone.CS_MODE_32
    return "16-bit protected mode", capstone.CS_MODE_16


def disassemble_one(code: bytes, address: int, mode: int) -> tuple[str, str, bytes] | None:
    """(mnemonic, text, bytes) of the first instruction in ``code``, or None if undecodable."""
    import capstone

    decoder = capstone.Cs(capstone.CS_ARCH_X86, mode)
    for instruction in decoder.disasm(code, address):
        text = f"{instruction.mnemonic} {instruction.op_str}".strip()
        return instruction.mnemonic, text, bytes(instruction.bytes)
    return None


def build_crash_report(
    vcpu_id: int,
    reason: str,
    regs: s.kvm_regs,
    sregs: s.kvm_sregs,
    memory: GuestMemory,
    *,
    emulation_failure: bool = False,
    instruction: bytes = b"",
    symbolize: Callable[[int], str | None] | None = None,
    backend: str = "",
    fallback_note: str | None = None,
) -> CrashReport:
    """``emulation_failure``: KVM could not emulate the instruction (an internal error, suberror 1);
    ``instruction``: its bytes when KVM reported them (``kvm.exits.RareExit.instruction``), else
    they are read at rip through the guest's page tables. ``fallback_note``: why vmscope's
    fallback emulator did not complete the instruction (it did not support it, or it is off)."""
    import capstone

    mode_name, cs_mode = cpu_mode_name(sregs)
    report = CrashReport(
        vcpu_id=vcpu_id,
        reason=reason,
        registers=general_registers(regs, GPR_ORDER),
        control=control_registers(sregs, ("cr0", "cr2", "cr3", "cr4", "efer"))
        | segment_selectors(sregs, ("cs",)),
        mode=mode_name,
        cpl=sregs.cs.dpl if sregs.cr0 & 1 else 0,
        backend=backend,
    )
    linear = (sregs.cs.base + regs.rip) if cs_mode != capstone.CS_MODE_64 else regs.rip
    code = instruction[:15]
    if not code:
        paging = PagingMode.from_sregs(sregs)
        try:
            code = read_virtual(memory, paging, linear, 15)
        except GuestMemoryError:
            try:  # the instruction may straddle into an unmapped page: take what is readable
                code = read_virtual(memory, paging, linear, 0x1000 - (linear & 0xFFF))[:15]
            except GuestMemoryError:
                code = b""
    decoded = disassemble_one(code, regs.rip, cs_mode) if code else None
    if decoded is not None:
        mnemonic, report.instruction, report.instruction_bytes = decoded
        feature = FEATURE_FOR_MNEMONIC.get(mnemonic.split()[-1])  # "lock cmpxchg16b" -> cmpxchg16b
        if feature is not None and backend == "kvm_pvm":
            report.hint = (
                f"this host's KVM (kvm_pvm, software virtualization) cannot emulate {mnemonic} in guest "
                "kernel mode, and CPUID masking (--cpu-features) does not reach guests on this host; "
                f"a Linux guest avoids it with clearcpuid={feature} on its command line"
            )
        elif feature is not None and emulation_failure:
            report.hint = (
                f"{mnemonic} could not be emulated; --cpu-features=-{feature} hides it from the guest"
            )
    else:
        report.instruction_bytes = code
    if backend == "kvm_pvm" and report.hint is None and emulation_failure:
        report.hint = (
            "this host's KVM is kvm_pvm (software virtualization): guest kernel code is emulated and some "
            "instructions cannot be; on a VT-x/AMD-V host this guest may run"
        )
    if fallback_note is not None and emulation_failure:
        report.hint = f"{report.hint}; {fallback_note}" if report.hint else fallback_note
    if symbolize is not None:
        report.symbol = symbolize(regs.rip)
    return report
