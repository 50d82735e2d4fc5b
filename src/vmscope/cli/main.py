"""The ``vmscope`` command: one subcommand per module in this package."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

# Everything else is imported inside main(): a Ctrl-C during start-up must end quietly (status 130),
# which only the try block there can promise.
if TYPE_CHECKING:
    import argparse

DESCRIPTION = """\
vmscope boots guests on Linux KVM and shows where every cycle of the virtual machine goes.

examples:
  vmscope run                                  boot the bundled demo guest
  vmscope run --elf guest.elf --cmdline 'n=5'  boot a PVH or plain ELF guest
  vmscope run --kernel bzImage --initrd initrd.img --cmdline console=ttyS0
  vmscope stat                                 exit statistics of the demo guest
  vmscope record -o demo.vmprof && vmscope report demo.vmprof --format html -o demo.html
"""


#: subcommand name -> module in this package (imported only when needed: start-up time matters)
SUBCOMMANDS = ("run", "stat", "record", "report", "diff", "initramfs", "ctl", "top")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; with a subcommand in ``argv`` only that subcommand's module is imported."""
    import argparse
    import importlib

    from vmscope import __version__

    parser = argparse.ArgumentParser(
        prog="vmscope", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"vmscope {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    requested = next((word for word in argv if not word.startswith("-")), None)
    for name in [requested] if requested in SUBCOMMANDS else SUBCOMMANDS:
        importlib.import_module(f"vmscope.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C anywhere, including the imports of start-up: no traceback, the shell's status
        return 130


def _main(argv: Sequence[str] | None) -> int:
    import logging

    from vmscope import log_sink
    from vmscope.errors import VmscopeError

    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    # guest-triggered lines are rate-limited and written by a thread of their own (see log_sink)
    log_sink.install(level, "vmscope: %(message)s" if args.verbose < 2 else "%(name)s: %(message)s")
    try:
        status: int = args.func(args)
        return status
    except VmscopeError as error:
        print(f"vmscope: {error}", file=sys.stderr)
        return error.exit_status
    finally:
        log_sink.uninstall()


def entry_point() -> NoReturn:
    """The ``vmscope`` command and ``python -m vmscope``: :func:`main`, then a quick exit."""
    _exit(main())


def _exit(status: int) -> NoReturn:
    """Exit without the interpreter's tear-down of every module (about 20 ms of a short run, issue
    15) once nothing is left to finish: output flushed, no other non-daemon thread alive (daemon
    threads die at exit either way). Otherwise, or if flushing fails, the ordinary way."""
    import logging
    import os
    import threading

    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe or stream: let the ordinary exit report it
        sys.exit(status)
    main_thread = threading.main_thread()
    if any(thread is not main_thread and not thread.daemon for thread in threading.enumerate()):
        sys.exit(status)
    os._exit(status & 0xFF)


if __name__ == "__main__":
    entry_point()
