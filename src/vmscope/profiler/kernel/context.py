"""Everything the profiler takes from a stock kernel image, and the run-time slide that places it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.btf import Btf, parse_btf
from vmscope.profiler.kernel.image import KernelImage, load_kernel_image
from vmscope.profiler.kernel.kallsyms import Kallsyms, parse_kallsyms
from vmscope.profiler.kernel.kaslr import choose_slide, idt_handler, slide_candidates
from vmscope.profiler.kernel.tasks import TaskLayout
from vmscope.profiler.unwinders.orc import OrcTable
from vmscope.symbols import SymbolEntry, SymbolTable

#: functions whose code bytes confirm a slide (any one matching suffices; alternatives patch some)
_VERIFY_SYMBOLS = ("entry_SYSCALL_64", "schedule", "do_idle", "start_kernel", "memcpy", "printk")
_VERIFY_OFFSET, _VERIFY_LENGTH = 16, 16
_MASK = 0xFFFF_FFFF_FFFF_FFFF


class KernelProfileInfo:
    """kallsyms and ORC from the image; :meth:`find_slide` places them in a running guest."""

    def __init__(
        self,
        image: KernelImage,
        kallsyms: Kallsyms,
        orc: OrcTable | None,
        btf: Btf | None = None,
        btf_problem: str = "no .BTF section in the image",
    ) -> None:
        self.image = image
        self.kallsyms = kallsyms
        self.orc = orc
        self.btf = btf
        self.slide: int | None = None
        self._image_range: tuple[int, int] | None = None
        #: why tasks cannot be named ("" when they can)
        self.task_problem = "" if btf is not None else btf_problem
        self.tasks: TaskLayout | None = None
        if btf is not None:
            try:
                self.tasks = TaskLayout.from_kernel(kallsyms, btf)
            except KernelTableError as error:
                self.task_problem = str(error)

    @classmethod
    def load(cls, path: str | Path, *, symbols_only: bool = False) -> KernelProfileInfo:
        """``symbols_only``: kallsyms alone, for naming addresses after a run (ORC and BTF cost
        about half a second more on a distribution kernel and serve only the recorder)."""
        image = load_kernel_image(path)
        kallsyms = parse_kallsyms(image.data)
        if symbols_only:
            return cls(image, kallsyms, None, btf_problem="not read (symbols only)")
        orc: OrcTable | None = None
        ips, unwind = image.section_bytes(".orc_unwind_ip"), image.section_bytes(".orc_unwind")
        if ips is not None and unwind is not None:
            try:
                orc = OrcTable.from_sections(ips, image.sections[".orc_unwind_ip"].address, unwind)
            except KernelTableError:
                orc = None  # symbols without stacks are still worth having
        btf: Btf | None = None
        btf_problem = "no .BTF section in the image"
        raw_btf = image.section_bytes(".BTF")
        if raw_btf is not None:
            try:
                btf = parse_btf(raw_btf)
            except KernelTableError as error:
                btf_problem = str(error)  # no task names, the rest stands
        return cls(image, kallsyms, orc, btf, btf_problem)

    def find_slide(self, read: Callable[[int], int | None], lstar: int | None, idt_base: int) -> int | None:
        """Try LSTAR and the IDT (read with ``read``); keep and return the slide once confirmed."""
        handlers = []
        for vector in (0, 6, 14):
            handler = idt_handler(read, idt_base, vector)
            if handler is not None:
                handlers.append((vector, handler))
        candidates = slide_candidates(self.kallsyms, lstar, handlers)
        slide = choose_slide(candidates, lambda slide: self._code_matches(read, slide))
        if slide is not None:
            self.slide = slide
        return slide

    def _code_matches(self, read: Callable[[int], int | None], slide: int) -> bool:
        for name in _VERIFY_SYMBOLS:
            address = self.kallsyms.address_of(name)
            if address is None:
                continue
            expected = self.image.bytes_at(address + _VERIFY_OFFSET, _VERIFY_LENGTH)
            if expected is None:
                continue
            words = [
                read((address + _VERIFY_OFFSET + slide + i) & _MASK) for i in range(0, _VERIFY_LENGTH, 8)
            ]
            if any(word is None for word in words):
                continue
            if b"".join((word or 0).to_bytes(8, "little") for word in words) == expected:
                return True
        return False

    def orc_table(self) -> OrcTable | None:
        if self.orc is None or self.slide is None:
            return None
        return self.orc.relocated(self.slide)

    def covers_text(self, address: int) -> bool:
        """Whether a run-time address lies in the kernel image (not in a module or elsewhere)."""
        if self._image_range is None:
            start = self.kallsyms.address_of("_text") or self.kallsyms.address_of("_stext") or 0
            end = self.kallsyms.address_of("_end") or self.kallsyms.address_of("_etext") or 0
            self._image_range = (start, end)
        start, end = self._image_range
        link = (address - (self.slide or 0)) & _MASK
        return start <= link < end

    def symbol_table(self) -> SymbolTable:
        """Code symbols at run-time addresses (link-time if no slide was found)."""
        slide = self.slide or 0
        entries = [
            SymbolEntry(name, (address + slide) & _MASK) for name, address in self.kallsyms.text_symbols()
        ]
        start = self.kallsyms.address_of("_stext") or self.kallsyms.address_of("_text") or 0
        end = self.kallsyms.address_of("_einittext") or self.kallsyms.address_of("_etext") or 0
        table = SymbolTable("kernel", entries, path=self.image.path, kind="kallsyms-image", load_bias=slide)
        if start and end > start:
            table.start, table.end = (start + slide) & _MASK, (end + slide) & _MASK
        return table
