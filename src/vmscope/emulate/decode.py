"""Decoding with capstone (detail mode) and the register names it uses.

Decoded instructions are cached by (code size, bytes): a guest that keeps failing on the
same instruction (clac on every timer tick) is decoded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import capstone
from capstone import x86_const as x86

CapstoneInstruction = Any  # capstone.CsInsn (untyped library)

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_decoders: dict[int, Any] = {}


def _decoder(bits: int) -> Any:
    decoder = _decoders.get(bits)
    if decoder is None:
        decoder = capstone.Cs(capstone.CS_ARCH_X86, _MODES[bits])
        decoder.detail = True
        _decoders[bits] = decoder
    return decoder


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded instruction with the fields the emulator reads on every call copied out of
    capstone's object (whose attributes are computed on each access)."""

    insn: CapstoneInstruction
    id: int
    mnemonic: str
    size: int


@lru_cache(maxsize=1024)
def decode(code: bytes, bits: int) -> Decoded | None:
    """The first instruction in ``code`` for a ``bits``-bit code segment, or None."""
    for instruction in _decoder(bits).disasm(code[:15], 0):
        return Decoded(instruction, int(instruction.id), str(instruction.mnemonic), int(instruction.size))
    return None


def _gpr_table() -> dict[str, tuple[str, int, int]]:
    """capstone register name -> (64-bit register, bit shift, width in bits)."""
    table: dict[str, tuple[str, int, int]] = {}
    legacy = {"a": "ax", "c": "cx", "d": "dx", "b": "bx"}
    for letter, word in legacy.items():
        full = "r" + word
        table[full] = (full, 0, 64)
        table["e" + word] = (full, 0, 32)
        table[word] = (full, 0, 16)
        table[letter + "l"] = (full, 0, 8)
        table[letter + "h"] = (full, 8, 8)
    for word in ("sp", "bp", "si", "di"):
        full = "r" + word
        table[full] = (full, 0, 64)
        table["e" + word] = (full, 0, 32)
        table[word] = (full, 0, 16)
        table[word + "l"] = (full, 0, 8)
    for number in range(8, 16):
        full = f"r{number}"
        table[full] = (full, 0, 64)
        table[full + "d"] = (full, 0, 32)
        table[full + "w"] = (full, 0, 16)
        table[full + "b"] = (full, 0, 8)
    table["rip"] = ("rip", 0, 64)
    table["eip"] = ("rip", 0, 32)
    return table


GPR_PARTS = _gpr_table()
STACK_BASES = frozenset({x86.X86_REG_RSP, x86.X86_REG_RBP, x86.X86_REG_ESP, x86.X86_REG_EBP,
                         x86.X86_REG_SP, x86.X86_REG_BP})  # fmt: skip
SEGMENT_NAMES = {
    x86.X86_REG_CS: "cs", x86.X86_REG_DS: "ds", x86.X86_REG_ES: "es",
    x86.X86_REG_FS: "fs", x86.X86_REG_GS: "gs", x86.X86_REG_SS: "ss",
}  # fmt: skip


def xmm_index(name: str) -> int | None:
    """4 for "xmm4", None for anything that is not an XMM register."""
    if name.startswith("xmm") and name[3:].isdigit():
        return int(name[3:])
    return None
