"""Moved to :mod:`vmscope.symbols` (a neutral module, so crash reports in vmm may use it); the
names stay importable from here for code written before the move."""

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
    parse_kallsyms_text,
    unknown_address_name,
)

__all__ = [
    "KERNEL_ADDRESS_START",
    "MAX_SIZELESS_EXTENT",
    "Symbol",
    "SymbolEntry",
    "SymbolFileError",
    "SymbolTable",
    "Symbolizer",
    "address_space",
    "is_kernel_address",
    "load_elf_symbols",
    "load_kallsyms",
    "load_symbol_file",
    "load_system_map",
    "parse_kallsyms_text",
    "unknown_address_name",
]
