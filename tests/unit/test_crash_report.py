"""Crash reports: instruction decoding from KVM's emulation-failure bytes and from guest memory."""

from __future__ import annotations

from vmscope.kvm import constants as c
from vmscope.kvm import structs as s
from vmscope.kvm.exits import decode_rare_exit
from vmscope.memory.guest_memory import GuestMemory
from vmscope.vmm.crash import build_crash_report

LOCK_CMPXCHG16B = bytes.fromhex("f0480fc70e")  # lock cmpxchg16b [rsi]


def long_mode_registers(rip: int) -> tuple[s.kvm_regs, s.kvm_sregs]:
    regs = s.kvm_regs(rip=rip, rsi=0x2000, rflags=2)
    sregs = s.kvm_sregs(cr0=0x1, efer=0x500)  # protected, paging off for the memory read
    sregs.cs.l = 1
    return regs, sregs


def reported_bytes(code: bytes) -> bytes:
    """The instruction bytes as KVM reports them in kvm_run and kvm.exits decodes them."""
    run = s.kvm_run(exit_reason=c.ExitReason.INTERNAL_ERROR)
    failure = run.exit.emulation_failure
    failure.suberror, failure.ndata = c.INTERNAL_ERROR_EMULATION, 4
    failure.flags = c.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    failure.insn_size = len(code)
    failure.insn_bytes[: len(code)] = list(code)
    rare_exit = decode_rare_exit(run)
    assert rare_exit.code == c.INTERNAL_ERROR_EMULATION
    return rare_exit.instruction


def test_emulation_failure_bytes_are_decoded_and_the_pvm_hint_names_clearcpuid() -> None:
    memory = GuestMemory.for_size(1 << 20)
    regs, sregs = long_mode_registers(0x1000)
    report = build_crash_report(
        0, "KVM internal error", regs, sregs, memory,
        emulation_failure=True, instruction=reported_bytes(LOCK_CMPXCHG16B),
        symbolize=lambda address: "slab_alloc+0x10" if address == 0x1000 else None, backend="kvm_pvm",
    )  # fmt: skip
    assert report.instruction == "lock cmpxchg16b xmmword ptr [rsi]"
    assert report.instruction_bytes == LOCK_CMPXCHG16B
    # CPUID masking does not reach a guest on kvm_pvm: the hint names the guest's own option
    assert report.hint is not None and "clearcpuid=cx16" in report.hint
    assert "--cpu-features=-" not in report.hint
    text = report.format()
    assert "in slab_alloc+0x10" in text and "faulting instruction: lock cmpxchg16b" in text


def test_without_kvm_bytes_the_instruction_is_read_from_guest_memory() -> None:
    memory = GuestMemory.for_size(1 << 20)
    memory.write(0x3000, bytes.fromhex("0f01d0"))  # xgetbv
    regs, sregs = long_mode_registers(0x3000)
    report = build_crash_report(0, "triple fault", regs, sregs, memory, backend="kvm_intel")
    assert report.instruction == "xgetbv"
    assert report.hint is None  # no emulation failure on a hardware host: nothing to mask


def test_an_unreadable_rip_gives_a_report_without_an_instruction() -> None:
    memory = GuestMemory.for_size(1 << 20)
    regs, sregs = long_mode_registers(0xFFFF_0000_0000)
    report = build_crash_report(0, "triple fault", regs, sregs, memory)
    assert report.instruction is None
    assert "guest crashed on vCPU 0: triple fault" in report.format()


def test_hardware_host_hint_names_the_cpu_features_mask() -> None:
    memory = GuestMemory.for_size(1 << 20)
    regs, sregs = long_mode_registers(0x1000)
    report = build_crash_report(
        0, "KVM internal error", regs, sregs, memory,
        emulation_failure=True, instruction=reported_bytes(LOCK_CMPXCHG16B),
        backend="kvm_intel",
    )  # fmt: skip
    assert report.hint is not None and "--cpu-features=-cx16" in report.hint


def test_hint_says_when_the_fallback_emulator_could_not_complete_it_either() -> None:
    memory = GuestMemory.for_size(1 << 20)
    regs, sregs = long_mode_registers(0x1000)
    note = "vmscope's fallback emulator could not complete it either: vpxor is not emulated"
    vpxor = bytes.fromhex("c5f9efc0")
    report = build_crash_report(
        0, "KVM internal error", regs, sregs, memory,
        emulation_failure=True, instruction=reported_bytes(vpxor),
        backend="kvm_pvm", fallback_note=note,
    )  # fmt: skip
    assert report.hint is not None and report.hint.endswith(note)
    assert "kvm_pvm" in report.hint
