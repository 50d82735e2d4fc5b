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
    from vmscope.profiler.model import Profile
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


def finished_profile(machine: Machine, args: argparse.Namespace, duration_s: float) -> Profile:
    """The run's final statistics, its emulated instructions named as record's profile would name
    them (call before ``machine.close()``: a stock kernel's slide is found in guest memory)."""
    from vmscope.profiler.guest_symbols import guest_symbol_tables, stock_kernel_image

    profile = snapshot(machine)
    profile.metadata.duration_ns = round(duration_s * 1e9)  # the emulated share's base
    if profile.emulated:  # the only per-guest-address table stat prints
        kernel = stock_kernel_image(args.kernel, machine.guest)
        profile.symbol_tables = guest_symbol_tables(machine, args.symbols, kernel)
    return profile


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
        profile = finished_profile(machine, args, result.duration_s)
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
