"""Building the bundled guests with the system toolchain: ELF shape, caching, reproducibility, errors."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from vmscope.errors import GuestBuildError
from vmscope.guest import DEMO_WORKLOAD_FUNCTIONS
from vmscope.guest.build import build_runtime_guest, cache_dir, demo_guest

XEN_ELFNOTE_PHYS32_ENTRY = 18

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("ld") is None, reason="gcc/binutils not installed"
)


def build_demo_into(cache: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMSCOPE_CACHE_DIR", str(cache))
        return demo_guest()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(scope="module")
def demo_elf(demo_cache: Path) -> Path:
    return build_demo_into(demo_cache)


def iter_notes(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, type, descriptor) of each note, parsed by hand (4-byte aligned fields)."""
    offset = 0
    while offset + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from("<III", data, offset)
        offset += 12
        name = data[offset : offset + namesz].rstrip(b"\0").decode()
        offset += (namesz + 3) & ~3
        yield name, note_type, data[offset : offset + descsz]
        offset += (descsz + 3) & ~3


def test_demo_is_an_elf64_with_the_pvh_note_in_a_pt_note_header(demo_elf: Path) -> None:
    assert demo_elf.parent.exists()
    with demo_elf.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf["e_machine"] == "EM_X86_64"
        segments = list(elf.iter_segments())
        loads = [s for s in segments if s["p_type"] == "PT_LOAD"]
        notes = [s for s in segments if s["p_type"] == "PT_NOTE"]
        pvh = [
            desc
            for segment in notes
            for name, note_type, desc in iter_notes(segment.data())
            if name == "Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY
        ]
        assert len(pvh) == 1
        desc = pvh[0]
        assert len(desc) in (4, 8)
        entry = int.from_bytes(desc, "little")
        containing = [s for s in loads if s["p_paddr"] <= entry < s["p_paddr"] + s["p_filesz"]]
        assert len(containing) == 1
        assert containing[0]["p_flags"] & P_FLAGS.PF_X
        # QEMU aligns the note name to p_align: 8 would misplace the entry
        assert all(s["p_align"] in (0, 1, 4) for s in notes)
        # loaded below 4 GiB at physical == virtual, above the VMM's boot structures
        for segment in loads:
            assert segment["p_paddr"] == segment["p_vaddr"] >= 0x100000
            assert segment["p_paddr"] + segment["p_memsz"] < 1 << 30


def test_demo_symbol_table_has_the_workload_functions(demo_elf: Path) -> None:
    with demo_elf.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert symtab is not None
        functions = {sym.name: sym for sym in symtab.iter_symbols() if sym["st_info"]["type"] == "STT_FUNC"}
        text = elf.get_section_by_name(".text")
        text_start, text_end = text["sh_addr"], text["sh_addr"] + text["sh_size"]
        for name in (*DEMO_WORKLOAD_FUNCTIONS, "guest_main", "run_in_user_mode", "printf"):
            assert name in functions, name
            sym = functions[name]
            assert sym["st_size"] > 0, name
            assert text_start <= sym["st_value"] < text_end, name
        assert elf.has_dwarf_info()


def test_build_is_reproducible_across_cache_dirs(demo_elf: Path, tmp_path: Path) -> None:
    other = build_demo_into(tmp_path / "other-cache")
    assert other != demo_elf
    assert other.name == demo_elf.name
    assert other.read_bytes() == demo_elf.read_bytes()
    # the temporary build directory leaves no trace in the output
    assert str(tmp_path).encode() not in other.read_bytes()
    assert [p.name for p in other.parent.iterdir()] == [other.name]


def test_second_build_reuses_the_cached_file(demo_elf: Path, demo_cache: Path) -> None:
    before = demo_elf.stat()
    again = build_demo_into(demo_cache)
    after = again.stat()
    assert again == demo_elf
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_source_gets_a_new_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "main.c"
    source.write_text('#include "vmscope_guest.h"\nint guest_main(const char *c) { (void)c; return 1; }\n')
    first = build_runtime_guest("probe", [source])
    source.write_text('#include "vmscope_guest.h"\nint guest_main(const char *c) { (void)c; return 2; }\n')
    second = build_runtime_guest("probe", [source])
    assert first != second
    assert first.exists() and second.exists()
    assert first.read_bytes() != second.read_bytes()


def test_concurrent_builds_produce_one_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda _: demo_guest(), range(3)))
    assert len(set(paths)) == 1
    with paths[0].open("rb") as f:
        assert ELFFile(f).elfclass == 64
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]


def test_missing_compiler_is_a_clear_guest_build_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.setenv("VMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(GuestBuildError) as info:
        demo_guest()
    assert str(info.value) == "gcc not found: install gcc and binutils (Debian: apt-get install gcc binutils)"


def test_compile_error_reports_the_first_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.c"
    source.write_text("int guest_main(const char *c) {\n    return undeclared_thing;\n}\n")
    with pytest.raises(GuestBuildError) as info:
        build_runtime_guest("broken", [source])
    message = str(info.value)
    assert "error" in message
    assert "undeclared_thing" in message
    assert f"{source}:2:" in message  # names the user's file, not the staged copy
    assert "\n" not in message
    assert not list((tmp_path / "cache").glob("*.elf"))
    assert not list((tmp_path / "cache").glob(".build-*"))


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMSCOPE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vmscope"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vmscope"
    monkeypatch.setenv("VMSCOPE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_a_cached_guest_starts_without_running_any_tool(
    demo_elf: Path, demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a cached guest ran a tool: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)
    assert build_demo_into(demo_cache) == demo_elf


def test_a_different_compiler_gets_a_new_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The toolchain is part of the key: here a gcc wrapper on PATH, then the same wrapper changed."""
    monkeypatch.setenv("VMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    real_gcc = shutil.which("gcc")
    assert real_gcc is not None
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "gcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real_gcc} "$@"\n')
    wrapper.chmod(0o755)
    system = demo_guest()
    monkeypatch.setenv("PATH", f"{wrapper_dir}:{os.environ['PATH']}")
    wrapped = demo_guest()
    wrapper.write_text(f'#!/bin/sh\n# upgraded\nexec {real_gcc} "$@"\n')
    upgraded = demo_guest()
    assert len({system, wrapped, upgraded}) == 3
    assert system.read_bytes() == wrapped.read_bytes() == upgraded.read_bytes()
