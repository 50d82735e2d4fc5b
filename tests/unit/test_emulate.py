"""The fallback emulator on a synthetic vCPU: results, flags, memory operands, faults, modes."""

from __future__ import annotations

import pytest

from tests.unit.synthetic_cpu import LONG_MODE, PROTECTED_32, SyntheticCpu
from vmscope.emulate import PF_PRESENT, PF_WRITE, Completed, RaiseException, Unsupported, emulate
from vmscope.emulate import xstate as xs

CF, PF, ZF, SF, OF, AC = 1, 1 << 2, 1 << 6, 1 << 7, 1 << 11, 1 << 18
DATA = 0x60_0000


def run(cpu: SyntheticCpu, code: str) -> object:
    return emulate(cpu, bytes.fromhex(code))


def completed(cpu: SyntheticCpu, code: str) -> None:
    rip = cpu.registers["rip"]
    outcome = run(cpu, code)
    assert isinstance(outcome, Completed), outcome
    assert cpu.registers["rip"] == rip + len(code) // 2


def test_int3_raises_bp_with_rip_after_the_instruction() -> None:
    cpu = SyntheticCpu()
    outcome = run(cpu, "cc")
    assert isinstance(outcome, RaiseException) and outcome.vector == 3 and outcome.error_code is None
    assert cpu.registers["rip"] == 0x40_0001


def test_popcnt_register_forms_and_operand_sizes() -> None:
    cpu = SyntheticCpu()
    cpu.registers.update(rcx=0xFFFF_0000_0000_00F1, rax=0xDEAD_BEEF_DEAD_BEEF, rflags=0x2 | CF | OF | SF)
    completed(cpu, "f3480fb8c1")  # popcnt rax, rcx
    assert cpu.registers["rax"] == 21
    assert cpu.registers["rflags"] & (CF | OF | SF | ZF | PF) == 0
    cpu.registers.update(rcx=0x1_0000, rax=0xDEAD_BEEF_DEAD_BEEF)
    completed(cpu, "66f30fb8c1")  # popcnt ax, cx: 16 bits, the rest of rax kept
    assert cpu.registers["rax"] == 0xDEAD_BEEF_DEAD_0000
    assert cpu.registers["rflags"] & ZF


def test_popcnt_memory_operand_with_fs_base_index_scale_and_displacement() -> None:
    cpu = SyntheticCpu()
    address = LONG_MODE.segment_bases["fs"] + 0x100 + 3 * 4 + 0x10
    cpu.map(address)
    cpu.poke(address, (0x7).to_bytes(4, "little"))
    cpu.registers.update(rbx=0x100, rcx=3, rax=0xFFFF_FFFF_FFFF_FFFF)
    completed(cpu, "64f30fb8448b10")  # popcnt eax, dword ptr fs:[rbx + rcx*4 + 0x10]
    assert cpu.registers["rax"] == 3  # a 32-bit destination is zero-extended


def test_memory_operand_page_fault_carries_address_and_error_code_and_changes_nothing() -> None:
    cpu = SyntheticCpu()
    cpu.registers.update(rbx=0x100, rcx=3, rax=0x55)
    before = dict(cpu.registers)
    outcome = run(cpu, "64f30fb8448b10")
    assert isinstance(outcome, RaiseException) and outcome.vector == 14
    assert outcome.cr2 == LONG_MODE.segment_bases["fs"] + 0x11C and outcome.error_code == 0
    assert cpu.registers == before


@pytest.mark.parametrize(
    ("code", "source", "result", "flags"),
    [
        ("f3480fbdc1", 0x0000_1000_0000_0000, 19, 0),  # lzcnt rax, rcx
        ("f3480fbdc1", 0, 64, CF),
        ("f3480fbdc1", 1 << 63, 0, ZF),
        ("f3480fbcc1", 0x80, 7, 0),  # tzcnt rax, rcx
        ("f3480fbcc1", 0, 64, CF),
        ("f3480fbcc1", 1, 0, ZF),
        ("480fbcc1", 0x0012_3400, 10, PF),  # bsf rax, rcx
        ("480fbdc1", 0x0012_3400, 20, PF),  # bsr rax, rcx
        ("480fbdc1", 0x80, 7, 0),
    ],
)
def test_bit_scans(code: str, source: int, result: int, flags: int) -> None:
    cpu = SyntheticCpu()
    cpu.registers.update(rcx=source, rflags=0x2 | OF | SF | CF | ZF)
    completed(cpu, code)
    assert cpu.registers["rax"] == result
    assert cpu.registers["rflags"] & (CF | PF | ZF | SF | OF) == flags


@pytest.mark.parametrize("code", ["480fbcc1", "480fbdc1", "0fbcc1"])
def test_bsf_bsr_of_zero_keep_the_destination(code: str) -> None:
    cpu = SyntheticCpu()
    cpu.registers.update(rcx=0, rax=0xAAAA_AAAA_BBBB_BBBB)
    completed(cpu, code)
    assert cpu.registers["rax"] == 0xAAAA_AAAA_BBBB_BBBB
    assert cpu.registers["rflags"] & (ZF | PF | CF) == ZF | PF


def test_clac_stac_and_their_ud_outside_ring_0() -> None:
    cpu = SyntheticCpu()
    completed(cpu, "0f01cb")
    assert cpu.registers["rflags"] & AC
    completed(cpu, "0f01ca")
    assert not cpu.registers["rflags"] & AC
    user = SyntheticCpu(control=LONG_MODE.__class__(**{**LONG_MODE.__dict__, "cpl": 3}))
    outcome = run(user, "0f01ca")
    assert isinstance(outcome, RaiseException) and outcome.vector == 6


def test_fwait_completes_and_raises_mf_for_a_pending_x87_exception() -> None:
    cpu = SyntheticCpu()
    completed(cpu, "9b")
    image = bytearray(cpu.image)
    xs.put(image, xs.FSW, 2, 0x80 | 0x1)
    cpu.image = bytes(image)
    outcome = run(cpu, "9b")
    assert isinstance(outcome, RaiseException) and outcome.vector == 16


def test_ldmxcsr_stmxcsr_and_gp_on_reserved_bits() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA)
    cpu.poke(DATA, (0x9F80).to_bytes(4, "little"))
    cpu.registers["rax"] = DATA
    completed(cpu, "0fae10")  # ldmxcsr [rax]
    assert xs.u(cpu.image, xs.MXCSR, 4) == 0x9F80
    cpu.registers["rax"] = DATA + 8
    completed(cpu, "0fae18")  # stmxcsr [rax]
    assert cpu.peek(DATA + 8, 4) == (0x9F80).to_bytes(4, "little")
    cpu.poke(DATA, (0x1_0000).to_bytes(4, "little"))  # reserved with mask 0xffff
    cpu.registers["rax"] = DATA
    outcome = run(cpu, "0fae10")
    assert isinstance(outcome, RaiseException) and (outcome.vector, outcome.error_code) == (13, 0)
    assert xs.u(cpu.image, xs.MXCSR, 4) == 0x9F80


def test_cmpxchg16b_equal_unequal_alignment_and_exclusivity() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA)
    cpu.poke(DATA, (1).to_bytes(8, "little") + (2).to_bytes(8, "little"))
    cpu.registers.update(rdi=DATA, rax=1, rdx=2, rbx=0xAA, rcx=0xBB)
    completed(cpu, "f0480fc70f")
    assert cpu.peek(DATA, 16) == (0xAA).to_bytes(8, "little") + (0xBB).to_bytes(8, "little")
    assert cpu.registers["rflags"] & ZF and cpu.exclusive_entries == 1
    cpu.registers.update(rax=5)
    completed(cpu, "f0480fc70f")
    assert not cpu.registers["rflags"] & ZF
    assert (cpu.registers["rax"], cpu.registers["rdx"]) == (0xAA, 0xBB)
    cpu.registers["rdi"] = DATA + 8
    outcome = run(cpu, "f0480fc70f")
    assert isinstance(outcome, RaiseException) and (outcome.vector, outcome.error_code) == (13, 0)


def test_cmpxchg_on_a_read_only_page_faults_with_write_error_code_even_when_unequal() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA, writable=False)
    cpu.registers.update(rdi=DATA, rax=9)
    outcome = run(cpu, "0fc70f")  # cmpxchg8b [rdi]
    assert isinstance(outcome, RaiseException) and outcome.vector == 14
    assert outcome.error_code == PF_PRESENT | PF_WRITE and outcome.cr2 == DATA
    assert cpu.registers["rax"] == 9


def test_cmpxchg8b_in_32_bit_mode_uses_the_ds_base() -> None:
    cpu = SyntheticCpu(PROTECTED_32)
    linear = PROTECTED_32.segment_bases["ds"] + 0x500
    cpu.map(linear)
    cpu.poke(linear, (0x0000_0002_0000_0001).to_bytes(8, "little"))
    cpu.registers.update(rdi=0x500, rax=1, rdx=2, rbx=0x33, rcx=0x44, rip=0x1000)
    completed(cpu, "0fc70f")
    assert cpu.peek(linear, 8) == (0x0000_0044_0000_0033).to_bytes(8, "little")


def test_32_bit_mode_stack_base_selects_ss() -> None:
    cpu = SyntheticCpu(PROTECTED_32)
    cpu.map(PROTECTED_32.segment_bases["ss"] + 0x108)
    cpu.poke(PROTECTED_32.segment_bases["ss"] + 0x108, (0xFF).to_bytes(4, "little"))
    cpu.registers.update(rbp=0x100, rip=0xFFFF_FFFD)
    outcome = run(cpu, "f30fb84508")  # popcnt eax, [ebp + 8]
    assert isinstance(outcome, Completed)
    assert cpu.registers["rax"] == 8
    assert cpu.registers["rip"] == 0x2  # eip wraps at 32 bits


def test_xgetbv_xsetbv() -> None:
    cpu = SyntheticCpu()
    cpu.registers["rcx"] = 0
    completed(cpu, "0f01d0")
    assert (cpu.registers["rax"], cpu.registers["rdx"]) == (0b111, 0)
    cpu.registers.update(rax=0b011, rdx=0)
    completed(cpu, "0f01d1")
    assert cpu.xcr0 == 0b011
    for bad in (0b110, 0b101, 0b1011):  # no x87; AVX without SSE; unsupported bit
        cpu.registers.update(rax=bad)
        outcome = run(cpu, "0f01d1")
        assert isinstance(outcome, RaiseException) and outcome.vector == 13, bad
    assert cpu.xcr0 == 0b011


def test_xsave_then_xrstor_round_trips_sse_and_avx_state() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA, 0x2000)
    cpu.set_xmm(5, bytes(range(16)))
    image = bytearray(cpu.image)
    image[576 + 16 * 5 : 576 + 16 * 6] = bytes(range(100, 116))  # YMM5 upper half
    xs.mark_in_use(image, xs.AVX_BIT)
    cpu.image = bytes(image)
    cpu.registers.update(rdi=DATA, rax=0b111, rdx=0)
    completed(cpu, "0fae27")  # xsave [rdi]
    assert cpu.peek(DATA + 160 + 5 * 16, 16) == bytes(range(16))
    assert cpu.peek(DATA + 576 + 5 * 16, 16) == bytes(range(100, 116))
    assert int.from_bytes(cpu.peek(DATA + 512, 8), "little") == 0b111
    cpu.set_xmm(5, bytes(16))
    completed(cpu, "0fae2f")  # xrstor [rdi]
    assert cpu.xmm(5) == bytes(range(16))
    # a component whose XSTATE_BV bit is clear is put in its initial state
    cpu.poke(DATA + 512, (0b011).to_bytes(8, "little"))
    completed(cpu, "0fae2f")
    assert cpu.image[576 + 80 : 576 + 96] == bytes(16)
    assert not xs.xstate_bv(cpu.image) & xs.AVX_BIT


def test_xsave_misaligned_is_gp_and_xrstor_with_bad_header_is_gp() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA, 0x2000)
    cpu.registers.update(rdi=DATA + 16, rax=0b11, rdx=0)
    outcome = run(cpu, "0fae27")
    assert isinstance(outcome, RaiseException) and outcome.vector == 13
    cpu.registers["rdi"] = DATA
    cpu.poke(DATA + 512, (1 << 5).to_bytes(8, "little"))  # a component XCR0 does not enable
    outcome = run(cpu, "0fae2f")
    assert isinstance(outcome, RaiseException) and outcome.vector == 13


def test_xsavec_writes_compacted_header_and_xrstor_reads_it_back() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA, 0x2000)
    cpu.set_xmm(1, b"\x11" * 16)
    image = bytearray(cpu.image)
    image[576 : 576 + 16] = b"\x22" * 16
    xs.mark_in_use(image, xs.AVX_BIT)
    cpu.image = bytes(image)
    cpu.registers.update(rdi=DATA, rax=0b101, rdx=0)  # x87 and AVX requested, SSE not
    completed(cpu, "0fc727")  # xsavec [rdi]
    assert int.from_bytes(cpu.peek(DATA + 520, 8), "little") == (1 << 63) | 0b101
    assert int.from_bytes(cpu.peek(DATA + 512, 8), "little") == 0b101
    assert cpu.peek(DATA + 576, 16) == b"\x22" * 16  # AVX packed right after the header
    assert cpu.peek(DATA + 160 + 16, 16) == bytes(16)  # SSE not saved
    cpu.image = bytes(bytearray(cpu.image)[:576] + bytes(16) + cpu.image[592:])
    completed(cpu, "0fae2f")  # xrstor of the compacted area
    assert cpu.image[576:592] == b"\x22" * 16


def test_fxsave64_fxrstor64() -> None:
    cpu = SyntheticCpu()
    cpu.map(DATA)
    cpu.set_xmm(9, b"\x09" * 16)
    cpu.registers["rdi"] = DATA
    completed(cpu, "480fae07")
    assert cpu.peek(DATA + 160 + 9 * 16, 16) == b"\x09" * 16
    assert cpu.peek(DATA + 24, 4) == (0x1F80).to_bytes(4, "little")
    cpu.set_xmm(9, bytes(16))
    completed(cpu, "480fae0f")
    assert cpu.xmm(9) == b"\x09" * 16
    cpu.registers["rdi"] = DATA + 8
    outcome = run(cpu, "480fae07")
    assert isinstance(outcome, RaiseException) and outcome.vector == 13


def test_rdrand_rdseed_set_cf_and_write_the_operand_size() -> None:
    cpu = SyntheticCpu()
    cpu.registers.update(rax=0xFFFF_FFFF_FFFF_FFFF, rflags=0x2 | ZF)
    completed(cpu, "480fc7f0")  # rdrand rax
    assert cpu.registers["rax"] == int.from_bytes(cpu.random[:8], "little")
    assert cpu.registers["rflags"] & (CF | ZF) == CF
    completed(cpu, "0fc7f8")  # rdseed eax
    assert cpu.registers["rax"] == int.from_bytes(cpu.random[:4], "little")


def test_sse_moves_and_integer_operations_through_the_xsave_image() -> None:
    cpu = SyntheticCpu()
    cpu.set_xmm(15, b"\xff" * 16)
    cpu.registers["rcx"] = 0x1122_3344_5566_7788
    completed(cpu, "66440f6ef9")  # movd xmm15, ecx: zero-extends into the register
    assert cpu.xmm(15) == (0x5566_7788).to_bytes(16, "little")
    cpu.set_xmm(1, (0xAABB_CCDD_EEFF_0011_2233).to_bytes(16, "little"))
    completed(cpu, "66480f7ec8")  # movq rax, xmm1
    assert cpu.registers["rax"] == 0xCCDD_EEFF_0011_2233
    cpu.map(DATA)
    lanes = b"".join(v.to_bytes(4, "little") for v in (1, 2, 3, 4))
    cpu.registers["rip"] = 0x40_0008
    target = 0x40_0008 + 8 + 0x100  # 16-byte aligned
    cpu.map(target)
    cpu.poke(target, lanes)
    completed(cpu, "660f6f0500010000")  # movdqa xmm0, [rip + 0x100]
    assert cpu.xmm(0) == lanes
    cpu.set_xmm(1, lanes)
    completed(cpu, "660f70c11b")  # pshufd xmm0, xmm1, 0x1b
    assert cpu.xmm(0) == b"".join(v.to_bytes(4, "little") for v in (4, 3, 2, 1))
    completed(cpu, "660ffec1")  # paddd xmm0, xmm1
    assert cpu.xmm(0) == (5).to_bytes(4, "little") * 4
    cpu.set_xmm(2, cpu.xmm(0))
    cpu.registers["rsi"] = DATA + 3  # movdqu: no alignment needed
    completed(cpu, "f30f7f16")
    assert cpu.peek(DATA + 3, 16) == cpu.xmm(2)
    completed(cpu, "660fefc9")  # pxor xmm1, xmm1
    assert cpu.xmm(1) == bytes(16)


def test_movdqa_misaligned_memory_is_gp() -> None:
    cpu = SyntheticCpu()
    target = cpu.registers["rip"] + 8 + 0x101
    cpu.map(target)
    outcome = run(cpu, "660f6f0501010000")
    assert isinstance(outcome, RaiseException) and (outcome.vector, outcome.error_code) == (13, 0)


def test_sse_with_cr0_ts_is_nm_and_without_osfxsr_is_ud() -> None:
    ts = SyntheticCpu(control=LONG_MODE.__class__(**{**LONG_MODE.__dict__, "cr0": LONG_MODE.cr0 | 8}))
    outcome = run(ts, "660fefc9")
    assert isinstance(outcome, RaiseException) and outcome.vector == 7
    no_fxsr = SyntheticCpu(control=LONG_MODE.__class__(**{**LONG_MODE.__dict__, "cr4": 0}))
    outcome = run(no_fxsr, "660fefc9")
    assert isinstance(outcome, RaiseException) and outcome.vector == 6


def test_unknown_and_avx_instructions_are_unsupported_with_a_reason() -> None:
    cpu = SyntheticCpu()
    outcome = run(cpu, "0f0b")  # ud2
    assert isinstance(outcome, Unsupported) and "ud2" in outcome.reason
    outcome = run(cpu, "c5f9efc0")  # vpxor xmm0, xmm0, xmm0
    assert isinstance(outcome, Unsupported) and "VEX" in outcome.reason
    assert cpu.registers["rip"] == 0x40_0000
