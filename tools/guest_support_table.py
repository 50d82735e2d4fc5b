"""The README's guest-support table, generated from the tests that verify each guest type.

Tests declare what they verify with ``@pytest.mark.guest_support(guest, devices=..., detail=...)``;
a test run with ``--guest-support-results FILE`` (tests/conftest.py) records how each marked test
ended and on which KVM backend. This script joins the two into a Markdown table and writes it
between the README's ``guest-support`` comment markers, or checks that the README still matches
(``tests/unit/test_guest_support_table.py`` does so on every test run, so the table cannot drift):

    python -m pytest tests/kvm --guest-support-results docs/guest-support-results.json  (any subset)
    python tools/guest_support_table.py --write README.md
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "guest-support-results.json"
BEGIN, END = "<!-- guest-support:begin -->", "<!-- guest-support:end -->"
#: every guest type vmscope loads, in table order; a type no test verifies still gets a row
GUEST_TYPES = (
    "bundled demo",
    "PVH ELF (bundled runtime)",
    "plain ELF64",
    "plain ELF32",
    "flat binary, real mode",
    "flat binary, protected mode",
    "flat binary, long mode",
    "Linux bzImage",
    "Linux PVH vmlinux",
)


@dataclass(frozen=True, slots=True)
class Declared:
    guest: str
    devices: str
    detail: str
    test: str  # "tests/kvm/test_x.py::test_name"


def declared(tests_dir: Path = ROOT / "tests") -> list[Declared]:
    """Every guest_support marker in the test sources (read with ast: nothing is imported)."""
    found = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and ast.unparse(decorator.func) == "pytest.mark.guest_support"
                ):
                    guest = ast.literal_eval(decorator.args[0])
                    options = {k.arg: ast.literal_eval(k.value) for k in decorator.keywords if k.arg}
                    if guest not in GUEST_TYPES:
                        raise ValueError(f"{path}:{node.lineno}: unknown guest type {guest!r}")
                    test = f"{path.relative_to(ROOT)}::{node.name}"
                    found.append(Declared(guest, options.get("devices", ""), options.get("detail", ""), test))
    return found


def load_results(path: Path = RESULTS) -> dict[str, dict[str, str]]:
    """test -> {"outcome": ..., "backend": ...} from a results file; {} when there is none."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {str(test): {str(k): str(v) for k, v in entry.items()} for test, entry in data["tests"].items()}


def render(rows: list[Declared], results: dict[str, dict[str, str]]) -> str:
    lines = [
        "| Guest | Devices | Kernel / detail | Verified on | Test |",
        "| --- | --- | --- | --- | --- |",
    ]
    by_guest = {guest: [row for row in rows if row.guest == guest] for guest in GUEST_TYPES}
    for guest, declared_rows in by_guest.items():
        if not declared_rows:
            lines.append(f"| {guest} | | | no test yet | |")
        for row in declared_rows:
            result = results.get(row.test)
            verified = f"{result['backend']}: {result['outcome']}" if result else "not run for this table"
            lines.append(f"| {guest} | {row.devices} | {row.detail} | {verified} | `{row.test}` |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file of a test run")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README", help="replace the table in this file")
    group.add_argument("--check", type=Path, metavar="README", help="exit 1 if its table differs")
    args = parser.parse_args()
    table = render(declared(), load_results(args.results))
    if args.write:
        text = args.write.read_text()
        readme_table(text)  # the markers must be there
        head, rest = text.split(BEGIN, 1)
        args.write.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
        return 0
    if args.check:
        if readme_table(args.check.read_text()) != table:
            print(
                f"{args.check}: guest-support table is out of date; run {sys.argv[0]} --write",
                file=sys.stderr,
            )
            return 1
        return 0
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
