"""The XSAVE area: layout of KVM_GET_XSAVE's image and of the guest's save areas.

Offsets are the architectural ones (Intel SDM vol. 1, 13.4): the legacy region (x87 and SSE,
the FXSAVE layout) in bytes 0-511, the XSAVE header at 512, extended components after it,
at fixed offsets in the standard format and packed in the compacted format.
"""

from __future__ import annotations

from vmscope.emulate.cpu import DEFAULT_XSTATE_LAYOUT, XstateComponent

IMAGE_SIZE = 4096
FCW, FSW, FTW, FOP, FIP, FDP = 0, 2, 4, 6, 8, 16
MXCSR, MXCSR_MASK = 24, 28
ST_REGS, XMM_REGS = 32, 160
LEGACY_SIZE = 512
HEADER = 512
HEADER_SIZE = 64
EXTENDED_START = HEADER + HEADER_SIZE
X87, SSE, AVX = 0, 1, 2
X87_BIT, SSE_BIT, AVX_BIT = 1 << X87, 1 << SSE, 1 << AVX
COMPACTED = 1 << 63
#: the MXCSR bits a CPU without DAZ would accept; used when the image carries no mask
DEFAULT_MXCSR_MASK = 0xFFBF
MXCSR_RESET = 0x1F80
FCW_RESET = 0x37F


def u(image: bytes | bytearray, offset: int, size: int) -> int:
    return int.from_bytes(image[offset : offset + size], "little")


def put(image: bytearray, offset: int, size: int, value: int) -> None:
    image[offset : offset + size] = value.to_bytes(size, "little")


def mxcsr_mask(image: bytes | bytearray) -> int:
    return u(image, MXCSR_MASK, 4) or DEFAULT_MXCSR_MASK


def get_xmm(image: bytes | bytearray, index: int) -> bytes:
    return bytes(image[XMM_REGS + 16 * index : XMM_REGS + 16 * index + 16])


def set_xmm(image: bytearray, index: int, value: bytes) -> None:
    image[XMM_REGS + 16 * index : XMM_REGS + 16 * index + 16] = value
    mark_in_use(image, SSE_BIT)


def xstate_bv(image: bytes | bytearray) -> int:
    return u(image, HEADER, 8)


def mark_in_use(image: bytearray, bits: int) -> None:
    put(image, HEADER, 8, xstate_bv(image) | bits)


def legacy_ranges(component: int, long_mode: bool = True) -> list[tuple[int, int]]:
    """(offset, size) pieces of the legacy region that belong to x87 (0) or SSE (1);
    MXCSR and its mask go with either (see the instructions)."""
    if component == X87:
        return [(0, MXCSR), (ST_REGS, XMM_REGS - ST_REGS)]
    return [(XMM_REGS, 16 * (16 if long_mode else 8))]


def init_legacy(component: int) -> bytes:
    """The legacy-region bytes of a component in its initial configuration."""
    if component == X87:
        state = bytearray(XMM_REGS)
        put(state, FCW, 2, FCW_RESET)
        return bytes(state)
    return bytes(LEGACY_SIZE - XMM_REGS)


def compacted_offsets(bitmap: int, layout: dict[int, XstateComponent]) -> dict[int, int]:
    """Where each extended component in ``bitmap`` lives in the compacted format."""
    offsets: dict[int, int] = {}
    location = EXTENDED_START
    for component in sorted(layout):
        if not bitmap >> component & 1:
            continue
        info = layout[component]
        if info.align64:
            location = (location + 63) & ~63
        offsets[component] = location
        location += info.size
    return offsets


def layout_or_default(layout: dict[int, XstateComponent] | None) -> dict[int, XstateComponent]:
    return dict(layout) if layout else dict(DEFAULT_XSTATE_LAYOUT)
