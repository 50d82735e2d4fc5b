"""``vmscope top``: a kvm_stat-like live view of a running VM's exits, over its control socket."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from vmscope.errors import ConfigError

# rich, the report helpers and the control client (socket, json) load when drawing, not for
# `vmscope top --help` (start-up time, issue 15)
if TYPE_CHECKING:
    from rich.console import Console, Group

    from vmscope.control.client import ControlClient

EPILOG = """\
Rows are exit reasons, ports and MMIO addresses; Total counts since the VM started, Rate/s and
Time% (share of the VMM's exit-handling time) cover the last interval. On a terminal the view
refreshes in place (Ctrl-C ends it); otherwise a plain table is printed per interval.

examples:
  vmscope run --control /tmp/vm.sock &
  vmscope top /tmp/vm.sock                      refresh every second until the VM stops
  vmscope top /tmp/vm.sock -d 0.5 --sort time   the most expensive exits first
  vmscope top /tmp/vm.sock -n 3 > exits.txt     three snapshots as plain text
"""

SORT_KEYS = ("count", "rate", "time")


# NamedTuples, not dataclasses: importing dataclasses would cost `--help` ~10 ms
class TopRow(NamedTuple):
    """One exit key in one interval."""

    event: str
    device: str
    total: int
    rate: float
    time_share: float
    mean_ns: float


class KvmStatRow(NamedTuple):
    name: str
    total: int
    rate: float


def _exit_keys(stats: dict[str, Any], vcpu: int | None) -> list[dict[str, Any]]:
    if vcpu is None:
        rows: list[dict[str, Any]] = stats["totals"]["exit_keys"]
        return rows
    for entry in stats["vcpus"]:
        if entry["vcpu"] == vcpu:
            vcpu_rows: list[dict[str, Any]] = entry["exit_keys"]
            return vcpu_rows
    raise ConfigError(f"--vcpu {vcpu}: the VM has no such vCPU (it has {len(stats['vcpus'])})")


def interval_seconds(previous: dict[str, Any], current: dict[str, Any]) -> float:
    return max((int(current["sampled_ns"]) - int(previous["sampled_ns"])) / 1e9, 1e-9)


def exit_rows(
    previous: dict[str, Any], current: dict[str, Any], vcpu: int | None = None, sort: str = "count"
) -> list[TopRow]:
    """Rows for the interval between two query-stats results, sorted by ``sort``."""
    seconds = interval_seconds(previous, current)
    before = {(row["key"], row["device"]): row for row in _exit_keys(previous, vcpu)}
    deltas = []
    for row in _exit_keys(current, vcpu):
        old = before.get((row["key"], row["device"]))
        count_delta = row["count"] - (old["count"] if old else 0)
        time_delta = row["total_ns"] - (old["total_ns"] if old else 0)
        deltas.append((row, count_delta, time_delta))
    handling_ns = sum(time_delta for _, _, time_delta in deltas) or 1
    rows = [
        TopRow(
            event=row["key"],
            device=row["device"] or "",
            total=row["count"],
            rate=count_delta / seconds,
            time_share=100.0 * time_delta / handling_ns,
            mean_ns=time_delta / count_delta if count_delta else float(row["mean_ns"]),
        )
        for row, count_delta, time_delta in deltas
    ]
    order = {
        "count": lambda r: (-r.total, r.event),
        "rate": lambda r: (-r.rate, -r.total, r.event),
        "time": lambda r: (-r.time_share, -r.total, r.event),
    }[sort]
    rows.sort(key=order)
    return rows


def kvm_rows(previous: dict[str, Any], current: dict[str, Any], vcpu: int | None = None) -> list[KvmStatRow]:
    """KVM's own counters (summed over vCPUs, or one vCPU), with their rate over the interval."""
    seconds = interval_seconds(previous, current)

    def counters(stats: dict[str, Any]) -> dict[str, int]:
        summed: dict[str, int] = {}
        for source, values in stats.get("kvm", {}).items():
            if not source.startswith("vcpu") or (vcpu is not None and source != f"vcpu{vcpu}"):
                continue
            for name, value in values.items():
                if isinstance(value, int):
                    summed[name] = summed.get(name, 0) + value
        return summed

    before, after = counters(previous), counters(current)
    rows = [
        KvmStatRow(name, total, (total - before.get(name, 0)) / seconds)
        for name, total in after.items()
        if total
    ]
    rows.sort(key=lambda r: (-r.rate, -r.total, r.name))
    return rows


def render(
    path: str,
    previous: dict[str, Any],
    current: dict[str, Any],
    args: argparse.Namespace,
    terminal: bool,
    max_rows: int | None,
) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from vmscope.profiler.report import format_us, make_table

    rows = exit_rows(previous, current, args.vcpu, args.sort)
    seconds = interval_seconds(previous, current)
    exits_per_s = sum(row.rate for row in rows)
    scope = "all vCPUs" if args.vcpu is None else f"vCPU {args.vcpu}"
    header = Text(
        f"vmscope top  {path}  {current['state']}  uptime {current['uptime_s']:.1f} s  "
        f"{scope}: {sum(row.total for row in rows)} exits, {exits_per_s:,.0f}/s over {seconds:.2f} s"
    )
    table = make_table("VM exits", terminal)
    table.add_column("Event")
    table.add_column("Device")
    table.add_column("Total", justify="right")
    table.add_column("Rate/s", justify="right")
    table.add_column("Time%", justify="right")
    table.add_column("Avg", justify="right")
    shown = rows if max_rows is None else rows[:max_rows]
    for row in shown:
        table.add_row(
            row.event,
            row.device,
            f"{row.total}",
            f"{row.rate:,.0f}",
            f"{row.time_share:.1f}",
            format_us(row.mean_ns),
        )
    parts: list[Text | Table] = [header, table]
    if args.kvm:
        kvm_table = make_table("KVM statistics", terminal)
        kvm_table.add_column("Counter")
        kvm_table.add_column("Total", justify="right")
        kvm_table.add_column("Rate/s", justify="right")
        kvm = kvm_rows(previous, current, args.vcpu)
        for kvm_row in kvm if max_rows is None else kvm[:max_rows]:
            kvm_table.add_row(kvm_row.name, f"{kvm_row.total}", f"{kvm_row.rate:,.0f}")
        parts.append(kvm_table)
    return Group(*parts)


def _poll(client: ControlClient, kvm: bool) -> dict[str, Any]:
    stats: dict[str, Any] = client.call("query-stats", kvm=kvm)
    return stats


def handle(args: argparse.Namespace) -> int:
    if args.delay <= 0:
        raise ConfigError(f"-d {args.delay:g}: the interval must be positive")
    if args.iterations is not None and args.iterations < 1:
        raise ConfigError(f"-n {args.iterations}: give at least one iteration")
    from rich.live import Live
    from rich.text import Text

    from vmscope.control.client import ControlClient, ControlConnectionError
    from vmscope.profiler.report import make_console

    console = make_console(sys.stdout)
    terminal = console.is_terminal
    shown = 0
    with ControlClient(args.socket) as client:
        previous = _poll(client, args.kvm)
        live: Live | None = None
        try:
            if terminal:
                live = Live(Text("waiting for the first interval..."), console=console, auto_refresh=False)
                live.start()
            while args.iterations is None or shown < args.iterations:
                time.sleep(args.delay)
                try:
                    current = _poll(client, args.kvm)
                except ControlConnectionError as error:
                    if shown == 0:
                        raise
                    print(f"vmscope top: the VM went away ({error})", file=sys.stderr)
                    break
                view = render(args.socket, previous, current, args, terminal, _row_limit(console, terminal))
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    console.print(view)
                    console.print()
                    sys.stdout.flush()
                shown += 1
                previous = current
                if current["state"] == "stopped":
                    break
        except KeyboardInterrupt:
            pass
        finally:
            if live is not None:
                live.stop()
    return 0


def _row_limit(console: Console, terminal: bool) -> int | None:
    if not terminal:
        return None
    return max(console.size.height - 8, 5)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "top",
        help="live view of a running VM's exits (like kvm_stat)",
        description="Poll a running VM's control socket (run --control PATH) and show its exits per reason, "
        "port and MMIO address: total count, rate and share of handling time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("socket", metavar="PATH", help="the control socket")
    parser.add_argument(
        "-d", "--delay", type=float, default=1.0, metavar="SECONDS", help="refresh interval (default 1)"
    )
    parser.add_argument(
        "-n",
        "--iterations",
        type=int,
        metavar="N",
        help="stop after N refreshes (default: until the VM stops)",
    )
    parser.add_argument("--sort", choices=SORT_KEYS, default="count", help="row order (default count)")
    parser.add_argument("--vcpu", type=int, metavar="N", help="only this vCPU")
    parser.add_argument("--kvm", action="store_true", help="also show KVM's own counters")
    parser.set_defaults(func=handle)
