"""Brendan Gregg's folded stacks: one line per unique stack, root first, ``a;b;c count``.

Feed it to flamegraph.pl, inferno, or speedscope. Exit samples end in a synthetic
``[exit IO port 0x3f8 out]`` frame so the graph shows which guest code causes which exits.
"""

from __future__ import annotations

from vmscope.profiler.analysis import FrameNamer, aggregate_stacks, select_samples
from vmscope.profiler.model import Profile


def sanitize_frame(name: str) -> str:
    """Frame names must not contain the separator ``;`` or line breaks."""
    return name.replace(";", ":").replace("\n", " ").replace("\r", " ")


def folded_lines(
    profile: Profile,
    origin: str = "timer",
    prefix: str = "none",
    vcpu: int | None = None,
    annotate_exits: bool = True,
) -> list[str]:
    """Sorted ``root;...;leaf count`` lines.

    ``prefix`` "vcpu" starts every stack with ``vcpuN``; "cpl" with ``kernel``/``user`` (from the
    sample's CPL and ip); "none" adds nothing.
    """
    namer = FrameNamer(profile.symbolizer())
    stacks = aggregate_stacks(select_samples(profile, vcpu, origin), namer, prefix, annotate_exits)
    lines = [
        f"{';'.join(sanitize_frame(name) for name in stack)} {weight:.0f}" for stack, weight in stacks.items()
    ]
    lines.sort()
    return lines


def export_folded(
    profile: Profile,
    origin: str = "timer",
    prefix: str = "none",
    vcpu: int | None = None,
) -> str:
    lines = folded_lines(profile, origin=origin, prefix=prefix, vcpu=vcpu)
    return "".join(f"{line}\n" for line in lines)
