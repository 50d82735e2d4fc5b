"""The top-level CLI: every subcommand is listed, and running one imports only that one."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import vmscope.cli
from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.cli.main import SUBCOMMANDS, build_parser
from vmscope.cli.run import FLAT_MODES

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_help_lists_every_subcommand() -> None:
    help_text = build_parser([]).format_help()
    for name in SUBCOMMANDS:
        assert f"    {name} " in help_text


def test_every_module_of_the_cli_package_is_a_subcommand() -> None:
    modules = {module.name for module in pkgutil.iter_modules(vmscope.cli.__path__)} - {"main"}
    assert modules == set(SUBCOMMANDS)


def test_help_lines_of_the_top_level_are_the_ones_the_modules_register() -> None:
    """`vmscope --help` lists SUBCOMMANDS without importing the modules: it must not drift from them."""

    def listing(register: object) -> str:
        parser = argparse.ArgumentParser(prog="vmscope")
        subparsers = parser.add_subparsers(metavar="COMMAND")
        register(subparsers)  # type: ignore[operator]
        return parser.format_help()

    for name, help_line in SUBCOMMANDS.items():
        module = importlib.import_module(f"vmscope.cli.{name}")
        from_module = listing(module.register)
        from_table = listing(lambda subparsers, n=name, h=help_line: subparsers.add_parser(n, help=h))
        assert from_table == from_module, name


def test_flat_mode_choices_are_the_cpu_modes() -> None:
    assert tuple(mode.value for mode in CpuMode) == FLAT_MODES


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
    pyelftools until a command actually runs; nor what only running needs and what costs start-up
    time of its own: dataclasses (inspect with it, ~10 ms), logging and the log sink, the CPU state,
    the profile model, the initramfs writer, the control client (socket, json), rich."""
    heavy = (
        "vmscope.vmm", "vmscope.kvm", "vmscope.loader", "vmscope.control.server", "elftools",
        "vmscope.arch", "vmscope.log_sink", "vmscope.profiler.model", "vmscope.initramfs",
        "vmscope.control.client", "dataclasses", "inspect", "logging", "json", "socket", "rich",
    )  # fmt: skip
    # what the interpreter's own start-up loaded (site hooks) is left out: not vmscope's doing
    probe = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import runpy\n"
        "try:\n"
        "    runpy.run_module('vmscope', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
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
        loaded = result.stdout.strip().splitlines()[-1].split()
        assert [m for m in loaded if m in heavy or m.startswith(tuple(f"{h}." for h in heavy))] == [], command
