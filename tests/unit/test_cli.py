"""The top-level CLI: every subcommand is listed, and running one imports only that one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vmscope.cli.main import SUBCOMMANDS, build_parser

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_help_lists_every_subcommand() -> None:
    help_text = build_parser([]).format_help()
    for name in SUBCOMMANDS:
        assert f"    {name} " in help_text


def test_running_one_subcommand_imports_no_other_subcommand_module() -> None:
    probe = (
        "import sys; from vmscope.cli.main import build_parser; build_parser(['-v', 'run', '--elf', 'x']); "
        "print(sorted(m for m in sys.modules if m.startswith('vmscope.cli.') and m != 'vmscope.cli.main'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": SRC}, check=True
    )
    assert result.stdout.strip() == "['vmscope.cli.run']"


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmscope", "nosuch"], capture_output=True, text=True, env={"PYTHONPATH": SRC}
    )
    assert result.returncode == 2
    assert "invalid choice: 'nosuch'" in result.stderr


def test_emulate_fallback_switch_is_shared_by_every_booting_subcommand() -> None:
    for command in ("run", "stat", "record"):
        argv = [command, "--elf", "x", "--emulate-fallback", "off"]
        if command == "record":
            argv[1:1] = ["-o", "x.vmprof"]
        assert build_parser(argv).parse_args(argv).emulate_fallback == "off", command
        default = argv[:-2]
        assert build_parser(default).parse_args(default).emulate_fallback == "on", command


def test_help_of_vmscope_and_of_every_subcommand_loads_no_machine() -> None:
    """Building parsers must stay cheap (issue 15): no vCPU loop, KVM binding, loaders or
    pyelftools until a command actually runs."""
    heavy = ("vmscope.vmm", "vmscope.kvm", "vmscope.loader", "vmscope.control.server", "elftools")
    probe = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('vmscope', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))\n"
    )
    for command in ([], *([name] for name in SUBCOMMANDS)):
        result = subprocess.run(
            [sys.executable, "-c", probe, *command, "--help"],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": SRC},
            check=True,
        )
        assert "usage: vmscope" in result.stdout
        assert result.stdout.strip().splitlines()[-1] == "[]", (command, result.stdout.splitlines()[-1])
