"""``vmscope ctl``: send one command to a running VMM's control socket and print the answer."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

from vmscope.errors import ConfigError

# json and the control client (socket) are imported by the functions that use them, not for
# `vmscope ctl --help` (start-up time, issue 15)

EPILOG = """\
arguments are KEY=VALUE; values that read as numbers (also 0x hex), true/false or JSON are sent
as such, anything else as a string. `vmscope ctl PATH help` lists the commands and arguments.

examples:
  vmscope run --control /tmp/vm.sock &             start a guest with a control socket
  vmscope ctl /tmp/vm.sock query-status
  vmscope ctl /tmp/vm.sock read-memory address=0x7c00 length=16
  vmscope ctl /tmp/vm.sock read-memory address=0xffffffff81000000 length=64 virtual=true
  vmscope ctl /tmp/vm.sock profile-start frequency_hz=499
  vmscope ctl /tmp/vm.sock profile-dump path=guest.vmprof
  vmscope ctl /tmp/vm.sock snapshot /tmp/vm.snap --stop   then: vmscope run --restore /tmp/vm.snap
  vmscope ctl /tmp/vm.sock quit
"""

#: arguments that name files: made absolute here, since the VMM may run in another directory
_PATH_ARGUMENTS = {"path"}


def parse_value(text: str) -> Any:
    """A KEY=VALUE value as JSON would carry it: int (decimal or 0x), number, bool, JSON, or string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
    if text[:1] in ('"', "[", "{"):
        import json

        try:
            return json.loads(text)
        except ValueError:
            raise ConfigError(f"argument value {text!r} looks like JSON but does not parse") from None
    return text


def parse_arguments(pairs: Sequence[str]) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ConfigError(f"argument {pair!r} is not KEY=VALUE")
        if key in arguments:
            raise ConfigError(f"argument {key!r} is given twice")
        parsed = parse_value(value)
        if key in _PATH_ARGUMENTS and isinstance(parsed, str):
            parsed = os.path.abspath(parsed)
        arguments[key] = parsed
    return arguments


def handle(args: argparse.Namespace) -> int:
    pairs = list(args.arguments)
    if args.control_command == "snapshot":  # `ctl SOCKET snapshot PATH [--stop]`
        pairs = [pair if "=" in pair else f"path={pair}" for pair in pairs]
        if args.stop:
            pairs.append("stop=true")
    elif args.stop:
        raise ConfigError("--stop applies to the snapshot command only")
    import json

    from vmscope.control.client import ControlClient

    arguments = parse_arguments(pairs)
    with ControlClient(args.socket, timeout=args.timeout) as client:
        result = client.call(args.control_command, **arguments)
    print(json.dumps(result, indent=2, sort_keys=False))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ctl",
        help="send a command to a running VM's control socket",
        description="Send one command to the control socket of a running vmscope (run --control PATH) "
        "and print its JSON result.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("socket", metavar="PATH", help="the control socket")
    parser.add_argument("control_command", metavar="COMMAND", help="command name (see: help)")
    parser.add_argument("arguments", nargs="*", metavar="KEY=VALUE", help="command arguments")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for the answer (default 30)",
    )
    parser.add_argument(
        "--stop", action="store_true", help="snapshot: end the VM after saving instead of resuming it"
    )
    parser.set_defaults(func=handle)
