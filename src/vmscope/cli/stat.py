"""``vmscope stat``: run a guest and print a perf-kvm-stat style table of its exits."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TYPE_CHECKING

from vmscope.cli.record import add_events_argument, counter_session, merge_run_arguments
from vmscope.cli.run import add_machine_arguments, build_machine, report_result, run_with_control
from vmscope.profiler.options import EVENT_CLASSES, EXIT_SORT_KEYS

if TYPE_CHECKING:  # imported by the handlers: --help must not load the machine
    from pathlib import Path

    from vmscope.profiler.model import Profile
    from vmscope.symbols import SymbolTable
    from vmscope.vmm.machine import Machine

EPILOG = """\
examples:
  vmscope stat                                   exits of the bundled demo guest
  vmscope stat --event ioport --sort time        port I/O exits, most expensive first
  vmscope stat -i 1 -- --elf guest.elf           a table every second while it runs
  vmscope stat --events task-clock,cycles        CPU time and guest/host cycles per vCPU and I/O thread
"""


def snapshot(machine: Machine) -> Profile:
    from vmscope.profiler.model import Profile
    from vmscope.profiler.recorder import fill_exit_statistics

    profile = Profile()
    profile.metadata.cpus = machine.cpu_count
    profile.metadata.kvm_backend = machine.kvm.backend
    fill_exit_statistics(profile, machine)
    return profile


def symbol_tables(machine: Machine, paths: list[Path]) -> list[SymbolTable]:
    """Tables of the guest image and ``--symbols`` files; one that cannot be read is left out
    (the table then shows addresses only)."""
    from vmscope.errors import VmscopeError
    from vmscope.symbols import load_symbol_file

    files = list(paths)
    if machine.guest is not None and machine.guest.symbol_file is not None:
        files.insert(0, machine.guest.symbol_file)
    tables: list[SymbolTable] = []
    for path in dict.fromkeys(files):
        try:
            tables.extend(load_symbol_file(path))
        except VmscopeError:
            continue
    return tables


def handle(args: argparse.Namespace) -> int:
    from vmscope import log_sink
    from vmscope.profiler.counter_report import render_counters
    from vmscope.profiler.report import ReportOptions, make_console, render_emulated, render_kvm_stat

    args = merge_run_arguments(args, "vmscope stat")
    counters = counter_session(args)
    machine = build_machine(args)
    options = ReportOptions(event=args.event, vcpu=args.vcpu, sort=args.sort)
    console = make_console(sys.stdout)
    stop_printing = threading.Event()

    def print_periodically() -> None:
        while not stop_printing.wait(args.interval):
            render_kvm_stat(snapshot(machine), console, options, console.is_terminal)

    try:
        printer = None
        if args.interval:
            printer = threading.Thread(target=print_periodically, name="vmscope-stat", daemon=True)
            printer.start()
        counters.start()
        try:
            result = run_with_control(machine, args)
        finally:
            counters.stop()
        stop_printing.set()
        if printer is not None:
            printer.join()
        profile = snapshot(machine)
        profile.metadata.duration_ns = round(result.duration_s * 1e9)  # the emulated share's base
        if profile.emulated:  # name the functions they lie in, as record's profile would
            profile.symbol_tables = symbol_tables(machine, args.symbols)
        counters.fill(profile)
        render_kvm_stat(profile, console, options, console.is_terminal)
        render_emulated(profile, console, options.vcpu, console.is_terminal)
        render_counters(profile, console, console.is_terminal)
        held_back = log_sink.counts()
        console.print(
            f"log lines held back: {held_back.suppressed} suppressed (rate limit per cause), "
            f"{held_back.dropped} dropped (log writer behind)",
            highlight=False,
        )
    finally:
        machine.close()
    report_result(result, args.quiet)
    return result.exit_status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stat",
        help="run a guest and print exit statistics (like perf kvm stat)",
        description="Run a guest and print a `perf kvm stat report`-style table of its VM exits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--event", choices=EVENT_CLASSES, default="vmexit", help="event class")
    parser.add_argument("--vcpu", type=int, metavar="N", help="only this vCPU")
    parser.add_argument("--sort", choices=EXIT_SORT_KEYS, default="samples", help="sort order")
    add_events_argument(parser)
    parser.add_argument("-i", "--interval", type=float, metavar="SECONDS", help="also print every SECONDS")
    add_machine_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=handle)
