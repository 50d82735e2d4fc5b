"""Profile exporters: folded stacks, speedscope, pprof, Chrome trace events, self-contained HTML.

:func:`export_profile` renders any of them to bytes; each module also has its own function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.errors import ConfigError

if TYPE_CHECKING:  # `vmscope report --help` reads EXPORT_FORMATS: it must not load the model
    from vmscope.profiler.model import Profile

#: format name -> (file suffix, binary?)
EXPORT_FORMATS: dict[str, tuple[str, bool]] = {
    "folded": (".folded", False),
    "speedscope": (".speedscope.json", False),
    "pprof": (".pb.gz", True),
    "chrome-trace": (".trace.json", False),
    "html": (".html", False),
}


def export_profile(
    profile: Profile, format_name: str, origin: str = "timer", vcpu: int | None = None, prefix: str = "none"
) -> bytes:
    """``profile`` in ``format_name`` (a key of :data:`EXPORT_FORMATS`).

    ``origin``/``vcpu`` select samples for folded and speedscope; ``prefix`` ("none", "vcpu", "cpl")
    adds a root frame to folded stacks. pprof, Chrome trace and HTML always hold everything.
    """
    if format_name == "folded":
        from vmscope.profiler.export.folded import export_folded

        return export_folded(profile, origin=origin, prefix=prefix, vcpu=vcpu).encode("utf-8")
    if format_name == "speedscope":
        from vmscope.profiler.export.speedscope import export_speedscope

        return export_speedscope(profile, origin=origin, vcpu=vcpu).encode("utf-8")
    if format_name == "pprof":
        from vmscope.profiler.export.pprof import export_pprof

        return export_pprof(profile)
    if format_name == "chrome-trace":
        from vmscope.profiler.export.chrome_trace import export_chrome_trace

        return export_chrome_trace(profile).encode("utf-8")
    if format_name == "html":
        from vmscope.profiler.export.html import export_html

        return export_html(profile).encode("utf-8")
    raise ConfigError(f"export format {format_name!r} is not one of {', '.join(EXPORT_FORMATS)}")
