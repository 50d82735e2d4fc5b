"""The KASLR slide of a running kernel, from state the CPU holds: MSR_LSTAR (the syscall entry)
and the IDT's handlers, compared with the link-time addresses of the same entry points."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from vmscope.profiler.kernel.kallsyms import Kallsyms

MSR_LSTAR = 0xC000_0082
#: the virtual base moves in steps of CONFIG_PHYSICAL_ALIGN (2 MiB on x86-64 distribution kernels)
SLIDE_ALIGN = 0x20_0000
_EARLY_IDT_HANDLER_SIZE = 9
#: (vector, entry point names in newer-to-older kernels)
_IDT_ENTRIES = (
    (14, ("asm_exc_page_fault", "page_fault")),
    (0, ("asm_exc_divide_error", "divide_error")),
    (6, ("asm_exc_invalid_op", "invalid_op")),
)
_MASK = 0xFFFF_FFFF_FFFF_FFFF


def idt_handler(read: Callable[[int], int | None], idt_base: int, vector: int) -> int | None:
    """The handler address of a 64-bit IDT gate, read through ``read`` (8-byte words)."""
    low = read(idt_base + 16 * vector)
    high = read(idt_base + 16 * vector + 8)
    if low is None or high is None or not low & (1 << 47):  # gate not present
        return None
    return (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | ((high & 0xFFFF_FFFF) << 32)


def slide_candidates(kallsyms: Kallsyms, lstar: int | None, handlers: Iterable[tuple[int, int]]) -> list[int]:
    """Slides implied by LSTAR and by ``(vector, handler)`` pairs, each 2 MiB aligned."""
    found: list[int] = []
    syscall = kallsyms.address_of("entry_SYSCALL_64")
    if lstar and syscall is not None:
        found.append((lstar - syscall) & _MASK)
    early = kallsyms.address_of("early_idt_handler_array")
    for vector, handler in handlers:
        for vector_wanted, names in _IDT_ENTRIES:
            if vector != vector_wanted:
                continue
            for name in names:
                address = kallsyms.address_of(name)
                if address is not None:
                    found.append((handler - address) & _MASK)
                    break
        if early is not None:  # early boot: the IDT still points at the early handler stubs
            found.append((handler - early - _EARLY_IDT_HANDLER_SIZE * vector) & _MASK)
    return [slide for slide in found if slide % SLIDE_ALIGN == 0 and _small(slide)]


def _small(slide: int) -> bool:
    # the kernel image moves within the top 2 GiB (or stays put): |slide| < 1 GiB
    signed = slide - (1 << 64) if slide >= 1 << 63 else slide
    return abs(signed) < 1 << 30


def choose_slide(candidates: list[int], verify: Callable[[int], bool] | None = None) -> int | None:
    """The candidate most sources agree on that ``verify`` (code bytes match the image) accepts."""
    for slide, _ in Counter(candidates).most_common():
        if verify is None or verify(slide):
            return slide
    return None
