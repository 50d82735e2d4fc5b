"""The stack-protector cost workload: the variants build, protect the functions they should,
and `vmscope diff` of their profiles names those functions with the expected change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from vmscope.guest.stack_protector import (
    ARRAY_FUNCTIONS,
    CONTROL_FUNCTION,
    available_variants,
    parse_phases,
)
from vmscope.profiler import profile_file
from vmscope.profiler.diff import function_time_changes

ROOT = Path(__file__).resolve().parents[2]


def function_sizes(image: Path) -> dict[str, int]:
    """Code bytes of the workload's functions (a canary adds a load, store, compare and a call)."""
    with image.open("rb") as stream:
        symbols = ELFFile(stream).get_section_by_name(".symtab")
        assert isinstance(symbols, SymbolTableSection)
        wanted = (*ARRAY_FUNCTIONS, CONTROL_FUNCTION)
        return {s.name: s["st_size"] for s in symbols.iter_symbols() if s.name in wanted}


@pytest.fixture(scope="module")
def variants() -> dict[str, Path]:
    return available_variants()


def test_canaries_go_exactly_where_each_variant_puts_them(variants: dict[str, Path]) -> None:
    none, strong, protect_all = (function_sizes(variants[v]) for v in ("none", "strong", "all"))
    for name in ARRAY_FUNCTIONS:  # functions with local arrays: protected by -strong and -all
        assert strong[name] > none[name] and protect_all[name] > none[name], name
    assert strong[CONTROL_FUNCTION] == none[CONTROL_FUNCTION]  # no array: -strong leaves it alone
    assert protect_all[CONTROL_FUNCTION] > none[CONTROL_FUNCTION]  # -all protects every function


def test_the_example_records_diffs_and_the_protected_control_function_gets_slower(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stack_protector_cost.py"), "--out", str(tmp_path),
         "--repeat", "3", "--calls", "250000", "--rounds", "60", "--profile-rounds", "200", "-F", "499"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "diff written to" in done.stdout
    for variant in variants:
        assert (tmp_path / f"{variant}.vmprof").is_file()
    diff = (tmp_path / "diff-none-all.txt").read_text()
    time_table = diff.split("Functions: estimated self time")[1].split("\n\n")[0]
    for name in (*ARRAY_FUNCTIONS, CONTROL_FUNCTION, "total (run time)"):
        assert f"| {name} " in time_table, name
    html = (tmp_path / "diff-none-all.html").read_text()
    assert "<table>" in html and "no_array" in html and "total (run time)" in html
    # -all adds a canary store, reload and compare to a function that touched no stack memory:
    # about +25% per call measured here (quiet host); "slower at all" is the generous threshold.
    # The guest's own TSC counts of its last runs (no profiler) decide; the profile diff must
    # show the function and a finite estimate.
    none_phase = parse_phases((tmp_path / "none.serial").read_text())[CONTROL_FUNCTION]
    all_phase = parse_phases((tmp_path / "all.serial").read_text())[CONTROL_FUNCTION]
    assert all_phase.best_round_cycles > none_phase.best_round_cycles * 1.02, (none_phase, all_phase)
    changes, total = function_time_changes(
        profile_file.load(tmp_path / "none.vmprof"), profile_file.load(tmp_path / "all.vmprof")
    )
    assert any(c.name == CONTROL_FUNCTION and c.a_ns > 0 and c.b_ns > 0 for c in changes)
    assert total.a_ns > 0 and total.b_ns > 0
