"""KASLR slide from LSTAR and IDT gates, checked against code bytes."""

from __future__ import annotations

from tests.unit.kernel_tables import KERNEL_BASE, build_kallsyms
from vmscope.profiler.kernel.kallsyms import parse_kallsyms
from vmscope.profiler.kernel.kaslr import choose_slide, idt_handler, slide_candidates

SYMBOLS = [
    ("entry_SYSCALL_64", "T", KERNEL_BASE + 0xC00080),
    ("asm_exc_divide_error", "T", KERNEL_BASE + 0xC00990),
    ("asm_exc_page_fault", "T", KERNEL_BASE + 0xC00BE0),
    ("early_idt_handler_array", "T", KERNEL_BASE + 0x2000000),
]
SLIDE = 0x2E00_0000
IDT = 0xFFFF_FE00_0000_0000


def gate(handler: int, present: bool = True) -> tuple[int, int]:
    low = (handler & 0xFFFF) | (0x10 << 16) | ((0x0E00 | (0x8000 if present else 0)) << 32)
    low |= ((handler >> 16) & 0xFFFF) << 48
    return low, handler >> 32


def reader(words: dict[int, int]):  # type: ignore[no-untyped-def]
    return words.get


def idt_with(handlers: dict[int, int], present: bool = True) -> dict[int, int]:
    words = {}
    for vector, handler in handlers.items():
        low, high = gate(handler, present)
        words[IDT + 16 * vector], words[IDT + 16 * vector + 8] = low, high
    return words


def test_idt_gate_decoding() -> None:
    words = idt_with({14: 0xFFFF_FFFF_AEC0_0BE0})
    assert idt_handler(reader(words), IDT, 14) == 0xFFFF_FFFF_AEC0_0BE0
    assert idt_handler(reader(words), IDT, 13) is None
    absent = idt_with({14: 0xFFFF_FFFF_AEC0_0BE0}, present=False)
    assert idt_handler(reader(absent), IDT, 14) is None


def test_lstar_and_idt_agree_on_the_slide() -> None:
    kallsyms = parse_kallsyms(build_kallsyms(SYMBOLS))
    handlers = [(14, KERNEL_BASE + 0xC00BE0 + SLIDE), (0, KERNEL_BASE + 0xC00990 + SLIDE)]
    found = slide_candidates(kallsyms, KERNEL_BASE + 0xC00080 + SLIDE, handlers)
    assert found.count(SLIDE) == 3
    assert choose_slide(found) == SLIDE


def test_early_boot_idt_and_unaligned_candidates() -> None:
    kallsyms = parse_kallsyms(build_kallsyms(SYMBOLS))
    early = [(14, KERNEL_BASE + 0x2000000 + 9 * 14 + SLIDE)]
    assert choose_slide(slide_candidates(kallsyms, None, early)) == SLIDE
    # a LSTAR that is not the kernel's entry (e.g. a trampoline) gives an unaligned slide: dropped
    assert slide_candidates(kallsyms, KERNEL_BASE + 0x1234, []) == []


def test_verification_rejects_a_slide_whose_code_does_not_match() -> None:
    assert choose_slide([SLIDE, SLIDE, 0], verify=lambda slide: slide == 0) == 0
    assert choose_slide([SLIDE], verify=lambda slide: False) is None
