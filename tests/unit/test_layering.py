"""The layering of docs/CONTRIBUTING.md, checked on the imports of every module under src/vmscope:
imports point down the list, never up. Type-only imports (under ``if TYPE_CHECKING:``) are
allowed from vmm and above, where a lower layer names the type of an object handed to it; the
layers below vmm never name an upper one at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).parents[2] / "src" / "vmscope"

#: higher rank = higher layer (docs/CONTRIBUTING.md, "Layering"); packages not listed are not checked
RANKS = {
    "cli": 6,
    "control": 5, "gdbstub": 5, "profiler": 5,
    "vmm": 4,
    "virtio": 3, "pci": 3,
    "devices": 2,
    "loader": 1, "arch": 1, "memory": 1,
    "kvm": 0,
}  # fmt: skip
#: layers whose modules may not import an upper layer even for type checking
NO_TYPE_ONLY_UPWARD = {"kvm", "memory", "arch", "devices"}
TYPE_ONLY = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for statement in node.body for child in ast.walk(statement))
    return inside


def imported_layers(path: Path) -> list[tuple[int, str, bool]]:
    """(line, top-level vmscope package, type-checking only) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "vmscope":  # from vmscope import profiler
                modules = [f"vmscope.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "vmscope" and len(parts) > 1:
                found.append((node.lineno, parts[1], id(node) in type_only))
    return found


def layering_violations(source: Path) -> list[str]:
    problems = []
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source)
        layer = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if layer not in RANKS:
            continue
        for line, target, type_only in imported_layers(path):
            if target not in RANKS or RANKS[target] <= RANKS[layer]:
                continue
            if type_only and layer not in NO_TYPE_ONLY_UPWARD:
                continue
            kind = "type-only import of" if type_only else "imports"
            problems.append(f"{relative}:{line}: {layer} {kind} {target}, a higher layer")
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    assert layering_violations(SOURCE) == []


@pytest.mark.parametrize(
    ("layer", "code", "expected"),
    [
        ("vmm", "from vmscope.profiler.symbols import Symbolizer\n", "vmm imports profiler"),
        ("vmm", "def f():\n    import vmscope.cli.run\n", "vmm imports cli"),
        ("kvm", "from vmscope.arch.x86.cpu_state import Segment\n", "kvm imports arch"),
        ("devices", "from vmscope import vmm\n", "devices imports vmm"),
        (
            "devices",
            TYPE_ONLY + "    from vmscope.vmm.machine import Machine\n",
            "devices type-only import of vmm",
        ),
    ],
)
def test_an_upward_import_is_found(tmp_path: Path, layer: str, code: str, expected: str) -> None:
    (tmp_path / layer).mkdir()
    (tmp_path / layer / "module.py").write_text(code)
    (problem,) = layering_violations(tmp_path)
    assert expected in problem


def test_type_only_imports_are_allowed_from_vmm_up(tmp_path: Path) -> None:
    (tmp_path / "vmm").mkdir()
    (tmp_path / "vmm" / "module.py").write_text(
        TYPE_ONLY + "    from vmscope.profiler.model import Profile\nfrom vmscope.kvm import Vcpu\n"
    )
    assert layering_violations(tmp_path) == []
