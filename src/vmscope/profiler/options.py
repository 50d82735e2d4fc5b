"""Choices and defaults of the profiler that the CLI shows in ``--help``.

A module of constants only, so that building the argument parsers imports none of the
profiler's machinery (rich, pyelftools, the recorder and the machine behind it).
"""

from __future__ import annotations

#: what ``report``/``stat`` --event selects
EVENT_CLASSES = ("vmexit", "ioport", "mmio")
EXIT_SORT_KEYS = ("samples", "time")
#: report also groups functions by guest process (perf report --sort comm,sym)
SORT_KEYS = (*EXIT_SORT_KEYS, "comm,sym")
#: which samples a report uses: time samples (kicks), exit samples, or both
ORIGIN_CHOICES = ("timer", "exit", "all")
DEFAULT_FREQUENCY_HZ = 99.0  # off a round number so it does not beat with guest timers
