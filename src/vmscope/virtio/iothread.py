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

from vmscope.virtio.device import VirtioDevice

log = logging.getLogger("vmscope.virtio.iothread")


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
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
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

    def __init__(self, device: VirtioDevice, *, queue_eventfds: bool = True) -> None:
        self.device = device
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
            self.device.queue_notify(index, seen)

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
