"""vmscope.profiler: the profile data model, latency histograms, symbolization, the profile file,
reports and exporters. The collection side (exit accounting, sampling, unwinding) fills
:class:`~vmscope.profiler.model.Profile`; see :mod:`vmscope.profiler.model` for how.
"""

from vmscope.histogram import LatencyHistogram
from vmscope.profiler.model import (
    ExitStat,
    Profile,
    ProfileMetadata,
    Sample,
    Span,
    UnclaimedAccess,
)
from vmscope.profiler.profile_file import ProfileFormatError, load, save
from vmscope.profiler.symbols import Symbol, SymbolFileError, Symbolizer, SymbolTable

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
