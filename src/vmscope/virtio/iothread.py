"""Per-device I/O threads: an epoll loop over eventfds, so the data path never runs on a vCPU.

:class:`IoThread` is the generic part: one thread, one ``selectors.EpollSelector``, a
callback per readable descriptor, and a stop eventfd for a clean shutdown.

:class:`VirtioIoThread` wires one :class:`VirtioDevice` to it (thread name
``io:<device name>``, e.g. ``io:virtio-blk0``, which is also the profiler's track name):

* one eventfd per virtqueue; the attachment registers each as a KVM ioeventfd on the
  QueueNotify address with datamatch = queue index, so a guest notification costs no
  userspace exit and wakes this thread, which calls ``queue_notify`` with the time it
  saw the event;
* optionally the resample eventfd of a level-triggered irqfd (see :mod:`vmscope.virtio.attach`);
* the device's host sources (a tap or UDP socket, a console input wake-up eventfd).

With ``queue_eventfds=False`` (``--iothreads=off``) only host sources are polled; the
queue notifications then run on the vCPU that exited on QueueNotify.

Adaptive polling (like QEMU's AioContext polling), for devices that ask for it
(``VirtioDevice.poll_queues``: virtio-blk). After serving a queue notification the thread keeps
reading the queue's available index for up to a window before it goes back to epoll: a
driver that publishes its next request within that window is served without the cost of a
thread wake-up. The window is bounded (:data:`MAX_POLL_NS`) and adapts as QEMU's does: it
doubles when a notification arrives after the window ended but within the maximum (a longer
window would have caught it) and halves when the queue stayed idle longer than that.
GIL and CPU. The loop holds the GIL for at most ``_POLL_HOLD_NS`` at a time, then sleeps
about a microsecond (timer slack lowered for this thread) so that a vCPU thread waiting for
the GIL gets it: releasing the GIL only around a syscall would let this thread take it
straight back, and the waiter would wait for the interpreter's 5 ms switch interval. A
stretch or a yield that takes far longer than asked (the CPU or the GIL was wanted
elsewhere: an oversubscribed host), or eight windows in a row that find nothing, stop
polling for 50 ms, so polling never competes for long with a vCPU for a CPU.
``VMSCOPE_VIRTIO_POLL_US`` sets the maximum window (0 turns polling off).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable

from vmscope import sandbox
from vmscope.errors import ConfigError
from vmscope.host_thread import name_host_thread, set_timer_slack
from vmscope.virtio.device import VirtioDevice

log = logging.getLogger("vmscope.virtio.iothread")

#: upper bound of the adaptive polling window after a queue notification, in nanoseconds
MAX_POLL_NS = 64_000
#: the window never shrinks below this while polling is on
MIN_POLL_NS = 4_000
POLL_ENVIRONMENT = "VMSCOPE_VIRTIO_POLL_US"


#: the longest stretch the poll loop holds the GIL before it sleeps briefly to hand it over
_POLL_HOLD_NS = 20_000
_POLL_YIELD_S = 1e-6
#: a polling stretch or yield this much longer than asked for means the CPU or GIL was wanted
_PREEMPTED_NS = 250_000
#: after that, or after this many windows in a row that found nothing, no polling for a while
_POLL_MISS_LIMIT = 8
_POLL_BACKOFF_NS = 50_000_000
#: timer slack of a polling I/O thread (Linux's default of 50 us would stretch every yield)
_POLL_TIMER_SLACK_NS = 1_000


def _yield_gil() -> bool:
    """Release the GIL with a short sleep, so a thread waiting for it gets it (dropping it only
    around a syscall lets this thread take it straight back). False when the sleep came back
    late (the CPU was wanted elsewhere)."""
    before = time.perf_counter_ns()
    time.sleep(_POLL_YIELD_S)
    return time.perf_counter_ns() - before <= _PREEMPTED_NS


def default_poll_ns() -> int:
    """:data:`MAX_POLL_NS`, or ``VMSCOPE_VIRTIO_POLL_US`` microseconds when that is set."""
    text = os.environ.get(POLL_ENVIRONMENT)
    if text is None:
        return MAX_POLL_NS
    try:
        return max(0, int(float(text) * 1000))
    except ValueError:
        log.warning(
            "%s=%r is not a number of microseconds; using %d", POLL_ENVIRONMENT, text, MAX_POLL_NS // 1000
        )
        return MAX_POLL_NS


def new_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd with count 0."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd's counter; 0 when it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class IoThread:
    """One thread serving readable descriptors through epoll until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._selector = selectors.EpollSelector()
        self._stop_fd = new_eventfd()
        self._selector.register(self._stop_fd, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._closed = False
        #: callbacks that raised (they are logged and the loop goes on)
        self.callback_errors = 0
        #: how many times the loop woke up, for statistics
        self.wakeups = 0

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the thread whenever ``fd`` is readable (level-triggered)."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        drain_eventfd(self._stop_fd)  # a thread started again after stop() must not end at once
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_host_thread(self.name)
        try:
            sandbox.enter("io")
        except ConfigError as error:
            log.error("%s: %s", self.name, error)
            return
        selector, stop_fd = self._selector, self._stop_fd
        while True:
            try:
                events = selector.select()
            except OSError as error:  # the selector was closed under us
                log.error("%s: epoll failed: %s", self.name, error)
                return
            self.wakeups += 1
            for key, _ in events:
                if key.fd == stop_fd:
                    return
                try:
                    key.data()
                except Exception:  # a broken handler must not end the thread for every device queue
                    self.callback_errors += 1
                    log.exception("%s: handler for fd %d failed", self.name, key.fd)

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the loop to end and wait for it; False if it is still inside a handler after ``timeout``."""
        thread = self._thread
        if thread is None:
            return True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._stop_fd, 1)
        if thread is not threading.current_thread():
            thread.join(timeout)
        if thread.is_alive():
            log.warning("%s: I/O thread did not stop within %.1f s", self.name, timeout)
            return False
        self._thread = None
        return True

    def close(self) -> None:
        """Stop the thread and close the selector and the stop eventfd (not the readers' fds)."""
        if self._closed:
            return
        if not self.stop():
            return  # still running: leave its descriptors open rather than pull them away
        self._closed = True
        self._selector.close()
        os.close(self._stop_fd)


class VirtioIoThread:
    """The I/O thread of one virtio device, with its queue eventfds (see the module docstring)."""

    def __init__(
        self, device: VirtioDevice, *, queue_eventfds: bool = True, poll_ns: int | None = None
    ) -> None:
        self.device = device
        #: the largest polling window (0: no polling); only queue eventfds are polled for
        if not queue_eventfds or not device.poll_queues:
            poll_ns = 0
        self.max_poll_ns = default_poll_ns() if poll_ns is None else max(0, poll_ns)
        self._poll_ns = self.max_poll_ns
        self._poll_ended_ns = 0
        self._poll_resume_ns = 0
        self._poll_misses = 0
        self._timer_slack_set = False
        #: polling statistics: windows started, and chains found by polling (wake-ups saved)
        self.poll_windows = 0
        self.poll_hits = 0
        #: times polling stopped for a while because the CPU or the GIL was wanted elsewhere
        self.poll_backoffs = 0
        self.thread = IoThread(f"io:{device.name}")
        self.queue_fds: list[int] = []
        self.resample_fd: int | None = None
        self._has_sources = False
        try:
            if queue_eventfds:
                for index in range(device.num_queues):
                    fd = new_eventfd()
                    self.queue_fds.append(fd)
                    self.thread.add_reader(fd, functools.partial(self._queue_event, index, fd))
            for source_index, (fd, callback) in enumerate(device.host_sources()):
                what = f"host event {source_index} (fd {fd})"
                self.thread.add_reader(fd, functools.partial(device.run_host_event, what, callback))
                self._has_sources = True
        except BaseException:
            self.close()
            raise

    @property
    def needed(self) -> bool:
        """Whether there is anything for the thread to poll."""
        return bool(self.queue_fds) or self._has_sources or self.resample_fd is not None

    def watch_resample(self, fd: int) -> None:
        """Poll a KVM irqfd resample eventfd and re-assert the interrupt while status bits stay set."""
        self.resample_fd = fd
        self.thread.add_reader(fd, functools.partial(self._resample_event, fd))

    def _queue_event(self, index: int, fd: int) -> None:
        seen = time.perf_counter_ns()
        if drain_eventfd(fd):
            if not self.max_poll_ns:
                self.device.queue_notify(index, seen)
                return
            self._adapt_poll_window(seen - self._poll_ended_ns)
            # read before serving: whatever the driver publishes from here on shows as a change
            served_idx = self.device.queue_avail_index(index)
            self.device.queue_notify(index, seen)
            if served_idx is not None:
                self._poll_queue(index, fd, served_idx)

    def _adapt_poll_window(self, waited_ns: int) -> None:
        """A notification woke the thread ``waited_ns`` after the last window ended: grow the
        window when a longer one (within the maximum) would have caught it, shrink it when the
        queue stayed idle for longer than any window could cover."""
        window = self._poll_ns
        if waited_ns <= self.max_poll_ns:
            if waited_ns > window:
                self._poll_ns = min(self.max_poll_ns, max(2 * window, MIN_POLL_NS))
        else:
            self._poll_ns = max(MIN_POLL_NS, window // 2)

    def _poll_queue(self, index: int, fd: int, served_idx: int) -> None:
        """Serve chains the driver publishes within the polling window (see the module docstring).

        ``served_idx`` is the available index read before the last ``queue_notify``: every
        chain up to it has been served, so only a different index means new work.
        """
        clock = time.perf_counter_ns
        start = clock()
        if start < self._poll_resume_ns:
            return
        if not self._timer_slack_set:
            set_timer_slack(_POLL_TIMER_SLACK_NS)  # this thread's short sleeps stay short
            self._timer_slack_set = True
        device = self.device
        avail_index = device.queue_avail_index
        window = self._poll_ns
        self.poll_windows += 1
        hits_before = self.poll_hits
        deadline = start + window
        spin_start = start  # start of the current stretch of pure polling
        yield_at = start + _POLL_HOLD_NS
        while True:
            now = clock()
            if now >= yield_at:
                # a stretch far longer than it should be, or a yield that came back late: another
                # thread wanted this CPU or the GIL, and polling would only slow it down
                if now - spin_start > _POLL_HOLD_NS + _PREEMPTED_NS or not _yield_gil():
                    self._poll_resume_ns = now + _POLL_BACKOFF_NS
                    self.poll_backoffs += 1
                    # a notification drained at the last deadline may announce a chain not served
                    # yet: serve it now, as epoll will not report that notification again
                    if avail_index(index) not in (served_idx, None):
                        drain_eventfd(fd)
                        device.queue_notify(index, clock())
                    break
                now = spin_start = clock()
                yield_at = now + _POLL_HOLD_NS
            current = avail_index(index)
            if current is None:  # reset, closed or broken: nothing to poll
                break
            if current != served_idx:
                # consume the notification that announced this work, so epoll does not wake for it
                drain_eventfd(fd)
                served_idx = current
                device.queue_notify(index, now)
                self.poll_hits += 1
                spin_start = clock()
                deadline = spin_start + window
            # at the deadline: a notification for chains already served must not wake epoll for
            # nothing; the driver publishes the index before it notifies, so draining first and
            # then looking at the index once more loses no chain
            elif now >= deadline and (not drain_eventfd(fd) or avail_index(index) == served_idx):
                break
        self._poll_ended_ns = clock()
        if self.poll_hits != hits_before:
            self._poll_misses = 0
        else:
            self._poll_misses += 1
            if self._poll_misses >= _POLL_MISS_LIMIT:  # the driver is slower than any window
                self._poll_misses = 0
                self._poll_resume_ns = self._poll_ended_ns + _POLL_BACKOFF_NS
                self.poll_backoffs += 1

    def _resample_event(self, fd: int) -> None:
        if drain_eventfd(fd):
            self.device.resample_interrupt()

    def kick(self, index: int) -> None:
        """Hand a notification that arrived as an MMIO exit to the I/O thread (never run it inline)."""
        if 0 <= index < len(self.queue_fds):
            os.eventfd_write(self.queue_fds[index], 1)
        else:
            self.device.stats.ignored_notifications += 1
            log.debug("%s: notification for missing queue %d ignored", self.device.name, index)

    def start(self) -> None:
        if self.needed:
            self.thread.start()

    def quiesce(self) -> None:
        """Stop the thread, then serve here every queue notification it had not served yet.

        With the vCPUs paused no new request arrives, so afterwards every request the driver
        submitted has completed (a snapshot's precondition); :meth:`start` resumes the thread.
        """
        self.thread.stop()
        for index, fd in enumerate(self.queue_fds):
            drain_eventfd(fd)
            # unconditionally: a chain published while the thread polled has no notification
            self.device.queue_notify(index)

    def stop(self, timeout: float = 5.0) -> bool:
        return self.thread.stop(timeout)

    def close(self) -> None:
        """Stop the thread and close the queue eventfds (the resample fd belongs to the attachment)."""
        self.thread.close()
        if self.thread.running:
            return
        fds, self.queue_fds = self.queue_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
