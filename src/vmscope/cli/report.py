"""``vmscope report``: show a recorded profile in the terminal or export it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

from vmscope.errors import ConfigError, VmscopeError
from vmscope.profiler.export import EXPORT_FORMATS
from vmscope.profiler.options import EVENT_CLASSES, ORIGIN_CHOICES, SORT_KEYS

FORMATS = ("text", *EXPORT_FORMATS)

EPILOG = """\
formats: text (terminal tables), folded (flamegraph.pl input), speedscope (JSON),
pprof (gzipped profile.proto), chrome-trace (ui.perfetto.dev / chrome://tracing), html (one
self-contained page with flame graphs, exit tables and a timeline).

examples:
  vmscope report run.vmprof                          top functions, exits by cause, exit events
  vmscope report run.vmprof --event ioport --vcpu 0 --sort time
  vmscope report run.vmprof --sort comm,sym           functions per guest process (stock kernels)
  vmscope report run.vmprof --format html -o run.html
  vmscope report run.vmprof --format folded --prefix vcpu | flamegraph.pl > run.svg
  vmscope report run.vmprof --symbols vmlinux --format pprof -o run.pb.gz
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "report",
        help="show or export a recorded profile",
        description="Show a vmscope profile as terminal tables or export it to another format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("profile", type=Path, metavar="FILE", help="profile file written by vmscope")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT", help="write here instead of stdout")
    parser.add_argument(
        "--event",
        choices=EVENT_CLASSES,
        default="vmexit",
        help="event class of the exit table (default vmexit)",
    )
    parser.add_argument("--vcpu", type=int, metavar="N", help="only this vCPU")
    parser.add_argument(
        "--sort",
        choices=SORT_KEYS,
        default="samples",
        help="order of the exit table (default samples); comm,sym adds functions grouped by guest process",
    )
    parser.add_argument(
        "--origin",
        choices=ORIGIN_CHOICES,
        default="timer",
        help="samples for functions/flame graphs: timer ticks, exits, or all (default timer)",
    )
    parser.add_argument(
        "--prefix",
        choices=("none", "vcpu", "cpl"),
        default="none",
        help="folded stacks: start each stack with its vCPU or kernel/user (default none)",
    )
    parser.add_argument("--limit", type=int, default=25, metavar="N", help="rows per table (default 25)")
    parser.add_argument(
        "--symbols",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="extra symbol file (ELF, System.map, kallsyms) for unnamed addresses; repeatable",
    )
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from vmscope.profiler import profile_file
    from vmscope.profiler.counter_report import render_counters
    from vmscope.profiler.export import export_profile
    from vmscope.profiler.report import ReportOptions, make_console, render_report
    from vmscope.symbols import load_symbol_file

    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    if args.vcpu is not None and args.vcpu < 0:
        raise ConfigError(f"--vcpu {args.vcpu}: must not be negative")
    profile = profile_file.load(args.profile)
    for path in args.symbols:
        profile.symbol_tables.extend(load_symbol_file(path))
    if args.vcpu is not None and args.vcpu not in profile.vcpus:
        raise ConfigError(
            f"--vcpu {args.vcpu}: {args.profile} has vCPUs {', '.join(map(str, profile.vcpus))}"
        )
    if args.format == "text":
        options = ReportOptions(
            event=args.event, vcpu=args.vcpu, sort=args.sort, origin=args.origin, limit=args.limit
        )
        if args.output is None:
            console = make_console()
            render_report(profile, console, options)
            render_counters(profile, console, console.is_terminal)
            return 0
        with _open_text(args.output) as stream:
            console = make_console(stream)
            render_report(profile, console, options)
            render_counters(profile, console, console.is_terminal)
        return 0
    data = export_profile(profile, args.format, origin=args.origin, vcpu=args.vcpu, prefix=args.prefix)
    if args.output is None:
        if EXPORT_FORMATS[args.format][1] and sys.stdout.isatty():
            raise ConfigError(f"--format {args.format} is binary: give -o FILE or redirect stdout")
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    _write(args.output, data)
    return 0


def _open_text(path: Path) -> TextIO:
    try:
        # reports carry guest data (functions, stacks): owner only, as the profile itself
        return open(
            os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w", encoding="utf-8"
        )
    except OSError as error:
        raise VmscopeError(f"{path}: cannot write: {error.strerror or error}") from None


def _write(path: Path, data: bytes) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(
            os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb"
        ) as stream:
            stream.write(data)
        os.replace(temporary, path)
    except OSError as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise VmscopeError(f"{path}: cannot write: {error.strerror or error}") from None
