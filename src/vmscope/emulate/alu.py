"""Bit-count instructions: results and flags as an Intel CPU produces them.

Defined flags follow the SDM. The flags the SDM calls undefined are set the way the
Intel CPUs this was checked on set them (tests/unit/test_emulate_differential.py compares
with the host CPU): bsf/bsr clear CF, OF, SF, AF and compute PF from the result (a zero
source counts as result 0); lzcnt, tzcnt and popcnt clear every flag they do not define.
"""

from __future__ import annotations

CF, PF, AF, ZF, SF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
ARITH_FLAGS = CF | PF | AF | ZF | SF | OF


def parity_flag(value: int) -> int:
    """PF: set when the low byte has an even number of one bits."""
    return PF if (value & 0xFF).bit_count() % 2 == 0 else 0


def popcnt(value: int, bits: int) -> tuple[int, int]:
    """(result, arithmetic flags)."""
    value &= (1 << bits) - 1
    return value.bit_count(), (ZF if value == 0 else 0)


def lzcnt(value: int, bits: int) -> tuple[int, int]:
    value &= (1 << bits) - 1
    result = bits - value.bit_length()
    return result, (CF if value == 0 else 0) | (ZF if result == 0 else 0)


def tzcnt(value: int, bits: int) -> tuple[int, int]:
    value &= (1 << bits) - 1
    result = bits if value == 0 else (value & -value).bit_length() - 1
    return result, (CF if value == 0 else 0) | (ZF if result == 0 else 0)


def bsf(value: int, bits: int) -> tuple[int | None, int]:
    """(index of the lowest set bit or None when the source is zero, flags); on None the
    destination keeps its value."""
    value &= (1 << bits) - 1
    if value == 0:
        return None, ZF | PF
    result = (value & -value).bit_length() - 1
    return result, parity_flag(result)


def bsr(value: int, bits: int) -> tuple[int | None, int]:
    value &= (1 << bits) - 1
    if value == 0:
        return None, ZF | PF
    result = value.bit_length() - 1
    return result, parity_flag(result)
