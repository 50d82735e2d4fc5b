"""The README's guest-support table is what the tests' guest_support markers and the recorded
results say (regenerate with tools/guest_support_table.py --write README.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "guest_support_table", ROOT / "tools" / "guest_support_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_matches_the_markers_and_recorded_results() -> None:
    tool = load_tool()
    expected = tool.render(tool.declared(), tool.load_results())
    assert tool.readme_table((ROOT / "README.md").read_text()) == expected


def test_every_marker_names_a_known_guest_type_and_a_real_test() -> None:
    tool = load_tool()
    rows = tool.declared()
    assert {row.guest for row in rows} >= {"bundled demo", "PVH ELF (bundled runtime)", "Linux PVH vmlinux"}
    for row in rows:
        path, name = row.test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text()
    # a recorded result only for tests that still carry a marker
    assert set(tool.load_results()) <= {row.test for row in rows}


def test_a_guest_type_without_a_test_says_so(tmp_path: Path) -> None:
    tool = load_tool()
    table = tool.render([], {})
    assert "| Linux bzImage | | | no test yet | |" in table
    row = tool.Declared("plain ELF64", "serial", "", "tests/kvm/test_x.py::test_y")
    table = tool.render([row], {"tests/kvm/test_x.py::test_y": {"outcome": "passed", "backend": "kvm_intel"}})
    assert "| plain ELF64 | serial |  | kvm_intel: passed | `tests/kvm/test_x.py::test_y` |" in table
