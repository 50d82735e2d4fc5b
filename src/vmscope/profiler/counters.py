"""Per-thread host counters of a running machine: each vCPU and I/O thread, guest and host apart.

A :class:`CounterSession` watches vmscope's threads start (they announce themselves when they
name themselves, :func:`vmscope.host_thread.watch_host_threads`) and opens the chosen perf
counters on each "vcpuN" and "io:..." thread right there, so nothing the thread does is missed.
Counters that cannot be opened are collected into one line per reason (:attr:`notes`), and
everything else goes on. With ``poll_interval_s`` a small thread reads every counter
periodically for the timeline's counter tracks. :meth:`stop` reads the final values (threads
that ended keep theirs) and :meth:`fill` puts them into a :class:`Profile`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmscope.errors import CounterUnavailableError
from vmscope.host.perf_events import CounterEvent, OpenFunction, ThreadCounter, syscall_open
from vmscope.host_thread import name_host_thread, watch_host_threads
from vmscope.profiler.model import CounterSeries, Profile, ThreadCounters

#: the threads counted: vCPU threads and device I/O threads
COUNTED_PREFIXES = ("vcpu", "io:")
DEFAULT_POLL_INTERVAL_S = 0.1


def counted_thread(name: str) -> bool:
    return name.startswith(COUNTED_PREFIXES)


@dataclass
class _Thread:
    name: str
    tid: int
    opened_ns: int
    counters: list[ThreadCounter]
    series: dict[str, CounterSeries] = field(default_factory=dict)


class CounterSession:
    """Counts ``events`` on every vCPU/I-O thread that starts between :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        events: Sequence[CounterEvent],
        *,
        poll_interval_s: float = 0.0,
        open_function: OpenFunction = syscall_open,
    ) -> None:
        self.events = list(events)
        self.poll_interval_s = poll_interval_s
        self._open = open_function
        self._threads: list[_Thread] = []
        self._failures: dict[str, dict[str, set[str]]] = {}  # reason -> event -> thread names
        self._user_only: set[str] = set()
        self._lock = threading.Lock()
        self._unwatch: object = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._origin_ns = 0
        self._stopped_ns = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, origin_ns: int | None = None) -> None:
        """Begin watching; series times are ns since ``origin_ns`` (a perf_counter_ns value)."""
        self._origin_ns = time.perf_counter_ns() if origin_ns is None else origin_ns
        if not self.events:
            return
        self._unwatch = watch_host_threads(self.attach)
        if self.poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll_loop, name="vmscope-counters", daemon=True)
            self._poller.start()

    def attach(self, name: str, tid: int) -> None:
        """Open the counters on thread ``tid`` (called on that thread as it names itself)."""
        if not counted_thread(name):
            return
        opened: list[ThreadCounter] = []
        for event in self.events:
            try:
                counter = ThreadCounter(event, tid, self._open)
            except CounterUnavailableError as error:
                with self._lock:
                    self._failures.setdefault(error.reason, {}).setdefault(event.name, set()).add(name)
                continue
            if counter.user_only:
                self._user_only.add(event.name)
            opened.append(counter)
        with self._lock:
            self._threads.append(_Thread(name, tid, time.perf_counter_ns() - self._origin_ns, opened))

    def stop(self) -> None:
        """Stop watching and polling, take the final readings and close every counter."""
        if callable(self._unwatch):
            self._unwatch()
            self._unwatch = None
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        self._stopped_ns = time.perf_counter_ns() - self._origin_ns
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if self.poll_interval_s > 0:
                self._sample(thread, self._stopped_ns)
            for counter in thread.counters:
                counter.close()

    # -- results ----------------------------------------------------------------------------

    @property
    def notes(self) -> list[str]:
        """One line per reason a counter could not be opened (or was limited)."""
        lines = []
        with self._lock:
            failures = {reason: dict(events) for reason, events in self._failures.items()}
        for reason, events in sorted(failures.items()):
            threads = sorted({thread for names in events.values() for thread in names})
            lines.append(f"counters not available: {', '.join(events)} on {', '.join(threads)}: {reason}")
        if self._user_only:
            lines.append(
                f"counters {', '.join(sorted(self._user_only))} count user space only "
                "(kernel.perf_event_paranoid forbids counting the kernel part)"
            )
        return lines

    def thread_counters(self) -> list[ThreadCounters]:
        """The latest readings per counted thread, vCPUs first."""
        with self._lock:
            threads = list(self._threads)
        result = []
        for thread in threads:
            values = {counter.event.name: counter.read().value for counter in thread.counters}
            end = self._stopped_ns or (time.perf_counter_ns() - self._origin_ns)
            result.append(ThreadCounters(thread.name, thread.tid, values, max(0, end - thread.opened_ns)))
        result.sort(key=lambda item: _thread_order(item.thread))
        return result

    def fill(self, profile: Profile) -> None:
        """Put the counters, their series and the notes into ``profile``."""
        profile.counters = self.thread_counters()
        with self._lock:
            profile.counter_series = [series for thread in self._threads for series in thread.series.values()]
        profile.counter_notes = self.notes

    # -- polling ----------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        name_host_thread()
        while not self._stop.wait(self.poll_interval_s):
            now = time.perf_counter_ns() - self._origin_ns
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                self._sample(thread, now)

    def _sample(self, thread: _Thread, now_ns: int) -> None:
        for counter in thread.counters:
            series = thread.series.get(counter.event.name)
            if series is None:
                series = thread.series[counter.event.name] = CounterSeries(thread.name, counter.event.name)
            series.times_ns.append(now_ns)
            series.values.append(counter.read().value)


def _thread_order(name: str) -> tuple[int, int, str]:
    if name.startswith("vcpu") and name[4:].isdigit():
        return (0, int(name[4:]), name)
    return (1, 0, name)
