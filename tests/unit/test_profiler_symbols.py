"""Symbolizer: real ELF images built with gcc (checked against nm), System.map/kallsyms text, errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmscope.errors import VmscopeError
from vmscope.symbols import (
    KERNEL_ADDRESS_START,
    MAX_SIZELESS_EXTENT,
    Symbol,
    SymbolEntry,
    SymbolFileError,
    Symbolizer,
    SymbolTable,
    address_space,
    is_kernel_address,
    load_elf_symbols,
    load_kallsyms,
    load_symbol_file,
    load_system_map,
)

C_SOURCE = r"""
static volatile int sink;
__attribute__((noinline)) static int helper(int x) { sink = x; return x * 3 + sink; }
__attribute__((noinline)) int compute(int n) {
    int t = 0;
    for (int i = 0; i < n; i++) t += helper(i);
    return t;
}
__attribute__((noinline)) void serial_putc(char c) { sink = c; }
int main(int argc, char **argv) { (void)argv; serial_putc('x'); return compute(argc); }
"""
FUNCTIONS = ("helper", "compute", "serial_putc", "main")


def compile_elf(tmp_path: Path, name: str, *flags: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the test ELF")
    source = tmp_path / "guest.c"
    source.write_text(C_SOURCE)
    output = tmp_path / name
    subprocess.run(
        [gcc, "-O1", "-g0", *flags, "-o", str(output), str(source)], check=True, capture_output=True
    )
    return output


def nm_functions(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of text symbols, as nm reports them."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed: no reference symbol addresses")
    output = subprocess.run(
        [nm, "-S", "--defined-only", str(path)], check=True, capture_output=True, text=True
    )
    symbols = {}
    for line in output.stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tT":
            symbols[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
    return symbols


@pytest.mark.parametrize(("flags", "bias"), [(("-no-pie",), 0), (("-pie", "-fPIE"), 0x5555_5555_4000)])
def test_elf_lookup_matches_nm(tmp_path: Path, flags: tuple[str, ...], bias: int) -> None:
    image = compile_elf(tmp_path, "guest", *flags)
    reference = nm_functions(image)
    assert set(FUNCTIONS) <= set(reference)
    table = load_elf_symbols(image, load_bias=bias)
    assert table.module == "guest" and table.kind == "elf" and table.path == str(image)
    symbolizer = Symbolizer([table])
    for name in FUNCTIONS:
        address, size = reference[name]
        assert size > 0
        runtime = address + bias
        assert symbolizer.lookup(runtime) == Symbol(name, 0, "guest")
        assert symbolizer.lookup(runtime + size - 1) == Symbol(name, size - 1, "guest")
        assert symbolizer.describe(runtime + 1) == f"{name}+0x1 [guest]"
    # every text symbol nm knows resolves to itself or an alias at the same address
    by_address: dict[int, set[str]] = {}
    for name, (address, _) in reference.items():
        by_address.setdefault(address, set()).add(name)
    for address, names in by_address.items():
        symbol = symbolizer.lookup(address + bias)
        assert symbol is not None and symbol.name in names and symbol.offset == 0


def test_elf_module_range_names_unsymbolized_addresses(tmp_path: Path) -> None:
    image = compile_elf(tmp_path, "guest", "-no-pie")
    table = load_elf_symbols(image, module="app")
    assert table.end > table.start
    symbolizer = Symbolizer([table])
    # the executable segment holds headers/padding outside every function: named module+offset
    gaps = [a for a in range(table.start, table.end) if symbolizer.lookup(a) is None]
    assert gaps, "expected some code-segment bytes outside every function"
    assert symbolizer.function_name(gaps[0]) == f"app+{gaps[0] - table.start:#x}"
    assert symbolizer.module_of(gaps[-1]) == ("app", gaps[-1] - table.start)
    assert symbolizer.function_name(table.end + 0x10_0000) == f"{table.end + 0x10_0000:#x}"


def test_load_symbol_file_detects_elf(tmp_path: Path) -> None:
    image = compile_elf(tmp_path, "guest", "-no-pie")
    tables = load_symbol_file(image)
    assert len(tables) == 1 and tables[0].kind == "elf"
    assert "compute" in {entry.name for entry in tables[0].symbols}


def test_stripped_and_truncated_elf_are_errors_naming_the_file(tmp_path: Path) -> None:
    image = compile_elf(tmp_path, "guest", "-no-pie")
    strip = shutil.which("strip")
    if strip is not None:
        stripped = tmp_path / "stripped"
        subprocess.run([strip, "-o", str(stripped), str(image)], check=True)
        with pytest.raises(SymbolFileError, match=rf"{stripped}: .*stripped"):
            load_elf_symbols(stripped)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(image.read_bytes()[:100])
    with pytest.raises(SymbolFileError) as caught:
        load_elf_symbols(truncated)
    assert str(truncated) in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, VmscopeError)
    with pytest.raises(SymbolFileError, match="cannot read"):
        load_symbol_file(tmp_path / "missing")


SYSTEM_MAP = """\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t secondary_startup
ffffffff81000200 T do_syscall_64
ffffffff81000300 D some_data
ffffffff81000400 W weak_handler
ffffffff81000500 T _etext
"""


def test_system_map_lookups_extend_to_next_code_symbol(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    tables = load_system_map(path)
    assert [t.module for t in tables] == ["kernel"] and tables[0].kind == "system.map"
    assert "some_data" not in {e.name for e in tables[0].symbols}
    symbolizer = Symbolizer(tables)
    base = 0xFFFF_FFFF_8100_0000
    assert symbolizer.lookup(base + 0x10) == Symbol("_text", 0x10, "kernel")  # first alias wins
    assert symbolizer.lookup(base + 0x1FF) == Symbol("secondary_startup", 0xFF, "kernel")
    # data symbols are skipped, so do_syscall_64 runs up to the next code symbol
    assert symbolizer.lookup(base + 0x3FF) == Symbol("do_syscall_64", 0x1FF, "kernel")
    assert symbolizer.lookup(base + 0x400) == Symbol("weak_handler", 0, "kernel")
    # the last sizeless symbol is capped
    assert symbolizer.lookup(base + 0x500 + MAX_SIZELESS_EXTENT - 1) is not None
    assert symbolizer.lookup(base + 0x500 + MAX_SIZELESS_EXTENT) is None
    assert symbolizer.lookup(base - 1) is None
    assert symbolizer.name_and_offset(base + 0x400) == "weak_handler+0x0"
    assert symbolizer.name_and_offset(base + 0x1FF) == "secondary_startup+0xff"
    assert symbolizer.name_and_offset(base - 1) is None


def test_kallsyms_splits_loadable_modules(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81001000 T schedule\n"
        "ffffffffc0000000 t virtblk_probe\t[virtio_blk]\n"
        "ffffffffc0000100 t virtblk_done\t[virtio_blk]\n"
    )
    tables = load_kallsyms(path, load_bias=0x1000)  # e.g. a KASLR shift
    assert {t.module: len(t.symbols) for t in tables} == {"kernel": 2, "virtio_blk": 2}
    symbolizer = Symbolizer(tables)
    assert symbolizer.lookup(0xFFFF_FFFF_C000_1104) == Symbol("virtblk_done", 4, "virtio_blk")
    assert symbolizer.lookup(0xFFFF_FFFF_8100_2000) == Symbol("schedule", 0, "kernel")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ffffffff81000000 T\n", "line 1: expected"),
        ("zzzz T foo\n", "line 1: bad address"),
        ("ffffffff81000000 T ok\n1ffffffffffffffff T big\n", "line 2: address"),
        ("0000000000000000 T a\n0000000000000000 T b\n", "kptr_restrict"),
        ("\n\n", "empty"),
    ],
)
def test_malformed_symbol_text_errors_name_path_and_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(text)
    with pytest.raises(SymbolFileError) as caught:
        load_kallsyms(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in str(caught.value)


def test_binary_garbage_is_not_a_symbol_file(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(SymbolFileError, match=f"{path}: not a System.map/kallsyms"):
        load_symbol_file(path)


def test_nested_symbols_resolve_to_innermost_and_container_resumes() -> None:
    table = SymbolTable(
        "m",
        [
            SymbolEntry("outer", 0x1000, 0x100),
            SymbolEntry("inner", 0x1010, 0x10),
            SymbolEntry("next", 0x1200),
        ],
        start=0x1000,
        end=0x1300,
    )
    symbolizer = Symbolizer([table])
    assert symbolizer.lookup(0x100F) == Symbol("outer", 0xF, "m")
    assert symbolizer.lookup(0x1010) == Symbol("inner", 0, "m")
    assert symbolizer.lookup(0x1020) == Symbol("outer", 0x20, "m")
    assert symbolizer.lookup(0x1100) is None
    assert symbolizer.function_name(0x1100) == "m+0x100"
    assert symbolizer.lookup(0x12FF) == Symbol("next", 0xFF, "m")  # sizeless, bounded by the module end
    assert symbolizer.function_name(0x1300) == "0x1300"


def test_lookup_over_many_symbols() -> None:
    entries = [SymbolEntry(f"f{i}", 0x10_0000 + i * 0x40, 0x30) for i in range(50_000)]
    symbolizer = Symbolizer([SymbolTable("big", entries)])
    for i in range(0, 50_000, 997):
        assert symbolizer.lookup(0x10_0000 + i * 0x40 + 0x2F) == Symbol(f"f{i}", 0x2F, "big")
        assert symbolizer.lookup(0x10_0000 + i * 0x40 + 0x30) is None


def test_kernel_user_classification() -> None:
    assert is_kernel_address(KERNEL_ADDRESS_START) and not is_kernel_address(KERNEL_ADDRESS_START - 1)
    assert address_space(0xFFFF_FFFF_8100_0000, cpl=3) == "kernel"
    assert address_space(0x40_1000, cpl=3) == "user"
    assert address_space(0x40_1000, cpl=0) == "kernel"  # low-half kernels (unikernels, test guests)
    assert address_space(0x40_1000) == "user"
