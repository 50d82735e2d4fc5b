"""``vmscope record``: run a guest while profiling it, write a profile file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vmscope.cli.run import add_machine_arguments, build_machine, report_result, run_with_control
from vmscope.errors import ConfigError
from vmscope.profiler.options import DEFAULT_FREQUENCY_HZ

if TYPE_CHECKING:
    from vmscope.profiler.counters import CounterSession

EPILOG = f"""\
Samples come from exits the guest makes anyway and, for vCPUs that do not exit during a
sampling period, from signal kicks at -F Hz (default {DEFAULT_FREQUENCY_HZ:g}; each kick costs the guest
time, about 100 us on software-virtualization hosts). Every exit is attributed to the guest
code that caused it.

examples:
  vmscope record -o demo.vmprof                       profile the bundled demo guest
  vmscope record -o k.vmprof -F 999 --symbols System.map -- --kernel bzImage --cmdline console=ttyS0
  vmscope report demo.vmprof
"""


def merge_run_arguments(args: argparse.Namespace, parser_prog: str) -> argparse.Namespace:
    """Machine options may follow ``--`` (``vmscope record -o F -- --elf g.elf``): parse them too."""
    extra = [a for a in (args.run_args or []) if a != "--"]
    if not extra:
        return args
    sub = argparse.ArgumentParser(prog=f"{parser_prog} -- ", add_help=False)
    add_machine_arguments(sub)
    parsed, unknown = sub.parse_known_args(extra)
    if unknown:
        raise ConfigError(f"unknown run arguments after --: {' '.join(unknown)}")
    defaults = vars(sub.parse_args([]))
    for name, value in vars(parsed).items():
        if value != defaults[name]:
            setattr(args, name, value)
    return args


def add_events_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", default="default", metavar="LIST",
        help="host perf counters per vCPU/I-O thread, comma-separated: task-clock, context-switches, "
        "cpu-migrations, page-faults, cycles, instructions, llc-misses, branch-misses (hardware ones "
        "as NAME:guest / NAME:host, or both); default, software, hardware, none (default: default)",
    )  # fmt: skip


def counter_session(args: argparse.Namespace, poll_interval_s: float = 0.0) -> CounterSession:
    """The counters ``--events`` asks for (unknown names are a usage error)."""
    from vmscope.host.perf_events import parse_events
    from vmscope.profiler.counters import CounterSession

    return CounterSession(parse_events(args.events), poll_interval_s=poll_interval_s)


def handle(args: argparse.Namespace) -> int:
    from vmscope.profiler import profile_file
    from vmscope.profiler.counters import DEFAULT_POLL_INTERVAL_S
    from vmscope.profiler.guest_symbols import stock_kernel_image
    from vmscope.profiler.recorder import ProfileRecorder

    args = merge_run_arguments(args, "vmscope record")
    output = Path(args.output)
    if output.parent and not output.parent.exists():
        raise ConfigError(f"-o {output}: directory {output.parent} does not exist")
    counters = counter_session(args, DEFAULT_POLL_INTERVAL_S)
    machine = build_machine(args)
    try:
        recorder = ProfileRecorder(
            machine,
            frequency_hz=args.frequency,
            max_depth=args.max_depth,
            symbol_files=args.symbols,
            kernel_image=stock_kernel_image(args.kernel, machine.guest),
        )
        recorder.profile.metadata.command_line = ["vmscope", *sys.argv[1:]]
        recorder.profile.metadata.kernel_command_line = args.cmdline
        recorder.start()
        counters.start(recorder.clock_origin_ns)
        try:
            result = run_with_control(machine, args)
        finally:
            counters.stop()
        profile = recorder.finish()
        counters.fill(profile)
    finally:
        machine.close()
    profile.compact_symbols()
    profile_file.save(profile, output)
    report_result(result, args.quiet)
    for note in profile.counter_notes:
        print(f"vmscope: {note}", file=sys.stderr)
    if not args.quiet:
        print(
            f"vmscope: wrote {output}: {len(profile.samples)} samples, "
            f"{sum(s.count for s in profile.exit_stats)} exits",
            file=sys.stderr,
        )
    return result.exit_status


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "record",
        help="run a guest under the profiler and write a profile file",
        description="Run a guest while recording exits, guest stack samples and a timeline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="profile file to write")
    parser.add_argument(
        "-F", "--frequency", type=float, default=DEFAULT_FREQUENCY_HZ, metavar="HZ",
        help=f"time-sample rate per vCPU (default {DEFAULT_FREQUENCY_HZ:g}; 0 = exit samples only)",
    )  # fmt: skip
    parser.add_argument("--max-depth", type=int, default=64, metavar="N", help="deepest stack to unwind")
    add_events_argument(parser)
    add_machine_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary lines")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=handle)
