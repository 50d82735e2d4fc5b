"""Where vmscope's log lines go: rate-limited per cause, written by a thread of their own.

A guest controls how often devices complain (a driver that misprograms a device in a loop makes
tens of thousands of warnings a second), and the host's stderr may be a pipe nobody reads. So:

- :class:`RateLimitFilter` lets through ``burst`` lines per cause per ``interval_s`` and counts the
  rest; the next line of that cause says how many were suppressed, and :meth:`LogSink.close`
  summarizes what is still pending. A cause is the logger, the message template and its first
  argument, which by convention names the device or vCPU (``"%s: queue %d ..." % (name, ...)``).
- :class:`LogSink` puts records on a bounded queue without waiting (a full queue drops the line
  and counts it) and one writer thread writes them with ``os.write`` on its own copy of the fd.
  vCPU and I/O threads never block on the log; only the writer does.

:func:`counts` gives both totals for ``vmscope stat`` and profiles.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

#: lines per cause let through in each interval, and the interval; $VMSCOPE_LOG_BURST overrides
#: the burst (0: no limit), for debugging a device model that needs every line
DEFAULT_BURST = 10
DEFAULT_INTERVAL_S = 5.0
BURST_ENVIRONMENT = "VMSCOPE_LOG_BURST"
#: distinct causes tracked; more than that share one bucket (a guest must not grow this table)
MAX_CAUSES = 1024
#: records waiting for the writer before new ones are dropped
DEFAULT_QUEUE_LINES = 1000

_Cause = tuple[str, int, str, str]
_OVERFLOW_CAUSE: _Cause = ("", 0, "(other causes)", "")


class LogCounts(NamedTuple):
    """Lines held back since start-up: over a cause's rate limit, or dropped with the writer behind."""

    suppressed: int = 0
    dropped: int = 0


class _CauseState:
    __slots__ = ("passed", "suppressed", "template", "window_start")

    def __init__(self, window_start: float, passed: int = 0, suppressed: int = 0, template: str = "") -> None:
        self.window_start = window_start
        self.passed = passed
        self.suppressed = suppressed
        self.template = template


def _cause_of(record: logging.LogRecord) -> _Cause:
    first = ""
    if isinstance(record.args, tuple) and record.args:
        first = str(record.args[0])[:64]
    return (record.name, record.levelno, str(record.msg)[:200], first)


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records per cause per ``interval_s``; the rest are counted, not emitted."""

    def __init__(
        self,
        burst: int = DEFAULT_BURST,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._causes: dict[_Cause, _CauseState] = {}
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        cause = _cause_of(record)
        now = self._clock()
        with self._lock:
            state = self._causes.get(cause)
            if state is None:
                if len(self._causes) >= MAX_CAUSES:
                    cause = _OVERFLOW_CAUSE
                    state = self._causes.get(cause)
                if state is None:
                    state = self._causes[cause] = _CauseState(now, template=cause[2])
            if now - state.window_start >= self.interval_s:
                held_back = state.suppressed
                state.window_start, state.passed, state.suppressed = now, 0, 0
                if held_back and isinstance(record.args, tuple):
                    record.msg = f"{record.msg} [%d similar lines suppressed]"
                    record.args = (*record.args, held_back)
            if state.passed >= self.burst:
                state.suppressed += 1
                self.suppressed_total += 1
                return False
            state.passed += 1
            return True

    @property
    def cause_count(self) -> int:
        """Distinct causes tracked (at most MAX_CAUSES + 1, the shared overflow bucket)."""
        return len(self._causes)

    def pending_summaries(self) -> list[str]:
        """One line per cause with suppressed lines not yet reported; resets them."""
        lines = []
        with self._lock:
            for state in self._causes.values():
                if state.suppressed:
                    lines.append(
                        f"{state.suppressed} more lines like {state.template!r} suppressed (rate limit)"
                    )
                    state.suppressed = 0
        return lines


class LogSink(logging.Handler):
    """A handler that never blocks its caller: a bounded queue drained by one writer thread."""

    def __init__(
        self,
        fd: int | None = None,
        queue_lines: int = DEFAULT_QUEUE_LINES,
        rate_limit: RateLimitFilter | None = None,
    ) -> None:
        super().__init__()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_lines)
        self.rate_limit = rate_limit if rate_limit is not None else RateLimitFilter()
        self.addFilter(self.rate_limit)
        self.dropped = 0
        # Our own copy of the descriptor: the writer may sit in write(2) on a full pipe without
        # holding any lock of sys.stderr, so the interpreter can still exit around it. A stderr
        # without a descriptor (captured in tests) is written through its stream instead.
        self._stream = sys.stderr
        self._fd: int | None = None
        try:
            self._fd = os.dup(sys.stderr.fileno() if fd is None else fd)
        except (AttributeError, OSError, ValueError):
            pass
        self._writer = threading.Thread(target=self._write_lines, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:  # a malformed record must not reach the vCPU that logged it
            line = f"vmscope: unprintable log record from {record.name}\n".encode()
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1  # a statistic: a race between two threads may lose one count

    def _write_lines(self) -> None:
        from vmscope.host_thread import name_host_thread

        name_host_thread("log-writer")
        while True:
            line = self._queue.get()
            if line is None:
                return
            try:
                if self._fd is None:
                    self._stream.write(line.decode("utf-8", "replace"))
                    self._stream.flush()
                    continue
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
            except (OSError, ValueError):
                pass  # stderr closed: nothing left to tell

    def close(self, timeout_s: float = 1.0) -> None:
        """Write the suppression summary and what is queued, waiting at most ``timeout_s``."""
        summaries = self.rate_limit.pending_summaries()
        if self.dropped:
            summaries.append(f"{self.dropped} log lines dropped (the log writer could not keep up)")
        for text in summaries:
            try:
                self._queue.put(f"vmscope: {text}\n".encode(), timeout=timeout_s)
            except queue.Full:
                break
        try:
            self._queue.put(None, timeout=timeout_s)
            if self._writer.ident is not None:  # a Ctrl-C during start-up can interrupt start()
                self._writer.join(timeout_s)
        except queue.Full:
            pass  # the writer is stuck on a pipe nobody reads; leave it, it is a daemon
        if not self._writer.is_alive() and self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()

    def counts(self) -> LogCounts:
        return LogCounts(self.rate_limit.suppressed_total, self.dropped)


_installed: LogSink | None = None


def install(level: int, format: str, fd: int | None = None) -> LogSink | None:
    """Route the root logger through a :class:`LogSink` at ``level``.

    Like ``logging.basicConfig``, does nothing when the root logger already has handlers (an
    embedding program's or a test runner's own): returns None then.
    """
    global _installed
    root = logging.getLogger()
    if root.handlers:
        return None
    burst_text = os.environ.get(BURST_ENVIRONMENT, "")
    burst = int(burst_text) if burst_text.isdigit() else DEFAULT_BURST
    sink = LogSink(fd, rate_limit=RateLimitFilter(burst=burst or sys.maxsize))
    sink.setFormatter(logging.Formatter(format))
    root.addHandler(sink)
    root.setLevel(level)
    _installed = sink
    return sink


def uninstall() -> None:
    """Flush and remove the installed sink (the end of a CLI command)."""
    global _installed
    if _installed is not None:
        logging.getLogger().removeHandler(_installed)
        _installed.close()
        _installed = None


def counts() -> LogCounts:
    """Totals of the installed sink; zeros when vmscope's log goes elsewhere (API use)."""
    return _installed.counts() if _installed is not None else LogCounts()
