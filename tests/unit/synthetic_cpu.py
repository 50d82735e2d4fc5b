"""A synthetic vCPU for the fallback emulator's tests: a register file, a page-mapped memory,
an XSAVE image and XCR0, implementing vmscope.emulate.CpuAccess."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vmscope.emulate import (
    DEFAULT_XSTATE_LAYOUT,
    PF_PRESENT,
    PF_WRITE,
    REGISTER_NAMES,
    ControlState,
    MemoryFault,
    XstateComponent,
)
from vmscope.emulate import xstate as xs

PAGE = 0x1000
LONG_MODE = ControlState(
    cr0=0x8000_0033, cr4=(1 << 9) | (1 << 10) | (1 << 18) | (1 << 5), efer=0x500,
    cs_l=True, cs_db=False, cpl=0, segment_bases={"fs": 0x7000_0000, "gs": 0x7100_0000},
)  # fmt: skip
PROTECTED_32 = ControlState(
    cr0=0x33, cr4=(1 << 9) | (1 << 18), efer=0, cs_l=False, cs_db=True, cpl=0,
    segment_bases={"ds": 0x1000, "ss": 0x2000, "es": 0, "cs": 0, "fs": 0x3000, "gs": 0},
)  # fmt: skip


class SyntheticCpu:
    """Pages are mapped on demand with :meth:`map`; anything else faults like real paging."""

    def __init__(self, control: ControlState = LONG_MODE) -> None:
        self.registers = dict.fromkeys(REGISTER_NAMES, 0)
        self.registers["rflags"] = 0x2
        self.registers["rip"] = 0x40_0000
        self.control = control
        self.pages: dict[int, bytearray] = {}
        self.read_only: set[int] = set()
        image = bytearray(xs.IMAGE_SIZE)
        xs.put(image, xs.FCW, 2, xs.FCW_RESET)
        xs.put(image, xs.MXCSR, 4, xs.MXCSR_RESET)
        xs.put(image, xs.MXCSR_MASK, 4, 0xFFFF)
        xs.put(image, xs.HEADER, 8, 0b11)
        self.image = bytes(image)
        self.xcr0 = 0b111
        self.supported = 0b111
        self.layout: dict[int, XstateComponent] = dict(DEFAULT_XSTATE_LAYOUT)
        self.exclusive_entries = 0
        self.random = bytes(range(1, 33))
        self.writes = 0

    # -- test set-up ---------------------------------------------------------------------------

    def map(self, address: int, size: int = PAGE, *, writable: bool = True) -> None:
        for page in range(address & ~(PAGE - 1), address + size, PAGE):
            self.pages.setdefault(page, bytearray(PAGE))
            if not writable:
                self.read_only.add(page)

    def poke(self, address: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            self.pages[(address + index) & ~(PAGE - 1)][(address + index) & (PAGE - 1)] = byte

    def peek(self, address: int, size: int) -> bytes:
        return bytes(self.pages[(address + i) & ~(PAGE - 1)][(address + i) & (PAGE - 1)] for i in range(size))

    def xmm(self, index: int) -> bytes:
        return xs.get_xmm(self.image, index)

    def set_xmm(self, index: int, value: bytes) -> None:
        image = bytearray(self.image)
        xs.set_xmm(image, index, value)
        self.image = bytes(image)

    # -- CpuAccess ---------------------------------------------------------------------------

    def get_register(self, name: str) -> int:
        return self.registers[name]

    def set_register(self, name: str, value: int) -> None:
        assert name in self.registers, name
        self.registers[name] = value

    def control_state(self) -> ControlState:
        return self.control

    def _page(self, address: int, write: bool) -> bytearray:
        page = address & ~(PAGE - 1)
        if page not in self.pages:
            raise MemoryFault(address, PF_WRITE if write else 0)
        if write and page in self.read_only:
            raise MemoryFault(address, PF_PRESENT | PF_WRITE)
        return self.pages[page]

    def read_memory(self, linear: int, size: int) -> bytes:
        return bytes(self._page(linear + i, False)[(linear + i) & (PAGE - 1)] for i in range(size))

    def check_writable(self, linear: int, size: int) -> None:
        for address in range(linear, linear + size):
            self._page(address, True)

    def write_memory(self, linear: int, data: bytes) -> None:
        self.check_writable(linear, len(data))
        self.writes += 1
        for index, byte in enumerate(data):
            self._page(linear + index, True)[(linear + index) & (PAGE - 1)] = byte

    def get_xsave(self) -> bytes:
        return self.image

    def set_xsave(self, image: bytes) -> None:
        assert len(image) == xs.IMAGE_SIZE
        self.image = image

    def get_xcr0(self) -> int:
        return self.xcr0

    def set_xcr0(self, value: int) -> None:
        self.xcr0 = value

    def supported_xcr0(self) -> int:
        return self.supported

    def xstate_layout(self) -> dict[int, XstateComponent]:
        return self.layout

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.exclusive_entries += 1
        yield

    def random_bytes(self, count: int) -> bytes:
        return self.random[:count]
