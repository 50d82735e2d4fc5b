"""vmscope.profiler: the profile data model, latency histograms, symbolization, the profile file,
reports and exporters. The collection side (exit accounting, sampling, unwinding) fills
:class:`~vmscope.profiler.model.Profile`; see :mod:`vmscope.profiler.model` for how.

The names below are imported on first use: the exit loop imports ``profiler.histogram`` and
must not pay for symbolization (pyelftools) and the profile file at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from vmscope.profiler.histogram import LatencyHistogram
    from vmscope.profiler.model import (
        ExitStat,
        Profile,
        ProfileMetadata,
        Sample,
        Span,
        UnclaimedAccess,
    )
    from vmscope.profiler.profile_file import ProfileFormatError, load, save
    from vmscope.symbols import Symbol, SymbolFileError, Symbolizer, SymbolTable

EXPORTS = {
    "LatencyHistogram": ".histogram",
    "ExitStat": ".model",
    "Profile": ".model",
    "ProfileMetadata": ".model",
    "Sample": ".model",
    "Span": ".model",
    "UnclaimedAccess": ".model",
    "ProfileFormatError": ".profile_file",
    "load": ".profile_file",
    "save": ".profile_file",
    "Symbol": ".symbols",
    "SymbolFileError": ".symbols",
    "Symbolizer": ".symbols",
    "SymbolTable": ".symbols",
}

__all__ = [
    "ExitStat",
    "LatencyHistogram",
    "Profile",
    "ProfileFormatError",
    "ProfileMetadata",
    "Sample",
    "Span",
    "Symbol",
    "SymbolFileError",
    "SymbolTable",
    "Symbolizer",
    "UnclaimedAccess",
    "load",
    "save",
]


__getattr__ = lazy_exports(__name__, EXPORTS)
