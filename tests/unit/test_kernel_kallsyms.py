"""kallsyms recovered from kernel images: synthetic tables in each layout, malformed ones, the real kernel."""

from __future__ import annotations

import pytest

from tests.unit.kernel_tables import build_kallsyms, sample_symbols
from vmscope.errors import KernelTableError
from vmscope.profiler.kernel.kallsyms import parse_kallsyms

LAYOUTS = [
    pytest.param({"order": "old"}, id="4.x-6.1"),
    pytest.param({"order": "old", "seqs": True, "marker_size": 4}, id="6.2-6.3-and-backports"),
    pytest.param({"order": "new", "seqs": True, "marker_size": 4}, id="6.4+"),
    pytest.param({"order": "old", "relative": False}, id="absolute-addresses"),
    pytest.param({"order": "new", "relative": False, "seqs": True}, id="absolute-addresses-6.4+"),
]


@pytest.mark.parametrize("options", LAYOUTS)
def test_parses_every_layout_back(options: dict[str, object]) -> None:
    symbols = sample_symbols()
    parsed = parse_kallsyms(build_kallsyms(symbols, **options))  # type: ignore[arg-type]
    assert parsed.names == [name for name, _, _ in symbols]
    assert parsed.types == [kind for _, kind, _ in symbols]
    assert parsed.addresses == [address for _, _, address in symbols]
    assert parsed.address_of("current_task") == 0x1FB80
    assert parsed.layout.seqs_of_names == bool(options.get("seqs", False) and options.get("order") == "old")


def test_text_symbols_are_code_only() -> None:
    symbols = sample_symbols(50)
    parsed = parse_kallsyms(build_kallsyms(symbols))
    text = dict(parsed.text_symbols())
    assert "start_kernel" in text and "init_task" not in text and "current_task" not in text


def test_symbol_count_not_multiple_of_256_and_single_block() -> None:
    for count in (1, 255, 256, 257):
        symbols = sample_symbols(count)
        assert len(parse_kallsyms(build_kallsyms(symbols, seqs=True, marker_size=4))) == len(symbols)


def test_image_without_tables_is_a_clear_error() -> None:
    with pytest.raises(KernelTableError, match="no token table"):
        parse_kallsyms(b"\x90" * 4096)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_tables_are_a_clear_error(cut: float) -> None:
    data = build_kallsyms(sample_symbols())
    with pytest.raises(KernelTableError, match="kallsyms"):
        parse_kallsyms(data[: int(len(data) * cut)])


def test_corrupt_token_index_and_unsorted_addresses_are_rejected() -> None:
    symbols = sample_symbols()
    data = bytearray(build_kallsyms(symbols))
    index = parse_kallsyms(bytes(data)).layout.token_index
    data[index + 2] ^= 0x7F  # the second token's offset
    with pytest.raises(KernelTableError):
        parse_kallsyms(bytes(data))
    shuffled = list(symbols)
    shuffled[5], shuffled[400] = shuffled[400], shuffled[5]
    with pytest.raises(KernelTableError, match="sorted"):
        parse_kallsyms(build_kallsyms(shuffled))


def test_out_of_range_names_length_is_rejected() -> None:
    symbols = sample_symbols(20)
    data = bytearray(build_kallsyms(symbols))
    parsed = parse_kallsyms(bytes(data))
    data[parsed.layout.names] = 0xFF  # a two-byte length far past the table
    with pytest.raises(KernelTableError):
        parse_kallsyms(bytes(data))


def test_debian_kernel_symbols() -> None:
    from tests.kernel_fixture import cached_kernel, kernel_cache_dir, pvh_vmlinux

    kernel = cached_kernel(kernel_cache_dir())
    if kernel is None:
        pytest.skip("no cached Debian kernel (tests/kernel_fixture.py downloads one)")
    vmlinux = pvh_vmlinux(kernel)
    if vmlinux.path is None:
        pytest.skip(f"cannot extract the vmlinux: {vmlinux.reason}")
    parsed = parse_kallsyms(vmlinux.path.read_bytes())
    assert len(parsed) > 50_000
    text = dict(parsed.text_symbols())
    for name in ("start_kernel", "entry_SYSCALL_64", "asm_exc_page_fault", "schedule", "do_idle"):
        assert text[name] >= 0xFFFF_FFFF_8000_0000, name
    assert parsed.address_of("_text") == 0xFFFF_FFFF_8100_0000  # the ELF's .text start
    assert parsed.address_of("current_task") is not None
