"""``vmscope diff A B``: which functions and exits changed share between two profiles."""

from __future__ import annotations

import argparse
from pathlib import Path

from vmscope.errors import ConfigError, VmscopeError
from vmscope.profiler.options import ORIGIN_CHOICES

EPILOG = """\
Shares are compared, so runs of different length compare fairly; deltas are percentage points
(B minus A), largest first.

examples:
  vmscope diff before.vmprof after.vmprof
  vmscope diff before.vmprof after.vmprof --vcpu 0 --limit 10
  vmscope diff before.vmprof after.vmprof --format html -o diff.html
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="compare two profiles",
        description="Show which guest functions and which exits changed their share from profile A to B.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("a", type=Path, metavar="A", help="the baseline profile")
    parser.add_argument("b", type=Path, metavar="B", help="the profile to compare with it")
    parser.add_argument("--vcpu", type=int, metavar="N", help="only this vCPU")
    parser.add_argument(
        "--origin",
        choices=ORIGIN_CHOICES,
        default="timer",
        help="samples compared for functions (default timer)",
    )
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="rows per table (default 20)")
    parser.add_argument("--format", choices=("text", "html"), default="text", help="output format")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT", help="write here instead of stdout")
    parser.set_defaults(func=run_diff)


def run_diff(args: argparse.Namespace) -> int:
    from vmscope.profiler import profile_file
    from vmscope.profiler.diff import render_diff
    from vmscope.profiler.export.diff_html import export_diff_html
    from vmscope.profiler.report import make_console

    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    a = profile_file.load(args.a)
    b = profile_file.load(args.b)
    if args.format == "html":
        page = export_diff_html(a, b, str(args.a), str(args.b), args.limit, args.origin, args.vcpu)
        if args.output is None:
            print(page, end="")
            return 0
        try:
            args.output.write_text(page, encoding="utf-8")
        except OSError as error:
            raise VmscopeError(f"{args.output}: cannot write: {error.strerror or error}") from None
        return 0
    render_diff(
        a,
        b,
        make_console(),
        a_name=str(args.a),
        b_name=str(args.b),
        limit=args.limit,
        origin=args.origin,
        vcpu=args.vcpu,
    )
    return 0
