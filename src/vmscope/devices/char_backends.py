"""Host ends of a serial port: where guest output goes and where guest input comes from.

A :class:`SerialBackend` is what the UART's transmitter writes to (on the vCPU thread, so
``write`` must neither raise nor block for long) and, for backends with input, a small
daemon reader thread that hands host bytes to the device through an :data:`InputSink`.
The sink applies flow control: it returns once the UART has taken every byte, so host
input is never lost to a receive-FIFO overrun however fast it arrives.

Backends, chosen with :func:`parse_serial_spec` / :func:`open_serial_backend`:

``stdio``      output to the terminal (fd 1); input from stdin only when stdin is not a
               TTY and not closed (a pipe or file: an interactive terminal would need raw
               mode, which vmscope does not take over)
``file:PATH``  output appended to PATH, one ``write`` syscall per guest write, so nothing
               sits in a user-space buffer when the VMM crashes; no input
``unix:PATH``  the VMM listens on a UNIX stream socket at PATH and serves one client at a
               time (a second one waits in the backlog); output while no client is
               connected is dropped, input comes from the client
``none``       output dropped, no input
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal, NamedTuple

from vmscope import sandbox
from vmscope.errors import ConfigError
from vmscope.host_thread import name_host_thread

log = logging.getLogger("vmscope.devices.serial")

#: Called by a backend's reader thread with host bytes. It blocks until the device has taken
#: them all and returns False once the device is closed, at which point the reader stops.
InputSink = Callable[[bytes], bool]

SerialKind = Literal["stdio", "file", "unix", "none"]

_SPEC_FORMS = "stdio, none, file:PATH or unix:PATH"
# sockaddr_un.sun_path holds 108 bytes on Linux, including the terminating NUL
_UNIX_PATH_MAX = 107
READ_CHUNK = 4096


class SerialBackend(ABC):
    """The host side of a serial port."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Deliver guest output. Runs on the vCPU thread: must not raise or block for long."""

    def start(self, deliver: InputSink) -> None:
        """Begin handing host input to ``deliver`` from a daemon thread (default: no input)."""

    def close(self) -> None:
        """Stop the reader thread and release files and sockets (default: nothing held)."""


class NullBackend(SerialBackend):
    """Drops output, produces no input."""

    def write(self, data: bytes) -> None:
        pass


class Waker:
    """A pipe a reader thread polls beside its input, so ``close`` can wake it up."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def wait_readable(self, fd: int) -> bool:
        """Block until ``fd`` is readable or at EOF (True), or until woken or ``fd`` is bad (False)."""
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        poller.register(fd, select.POLLIN)
        while True:
            try:
                events = poller.poll()
            except OSError:
                return False
            ready = {ready_fd: mask for ready_fd, mask in events}
            if self._read_fd in ready:
                return False
            mask = ready.get(fd, 0)
            if mask & select.POLLNVAL:
                return False
            if mask:
                return True

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # pipe already full: the reader is being woken anyway
            os.write(self._write_fd, b"x")

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_all_fd(fd: int, data: bytes) -> None:
    """os.write until everything is written, waiting out a non-blocking descriptor."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


def _stdin_fd_if_not_interactive() -> int | None:
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        return None
    try:
        fd = stdin.fileno()
        return None if os.isatty(fd) else fd
    except (OSError, ValueError):  # replaced by an object without a descriptor (e.g. under pytest)
        return None


class StdioBackend(SerialBackend):
    """Output to a terminal or pipe descriptor, input from a non-interactive descriptor.

    ``StdioBackend()`` writes to fd 1 and reads fd 0 when stdin is neither a TTY nor closed.
    Descriptors are borrowed, never closed.
    """

    def __init__(self, output_fd: int = 1, input_fd: int | Literal["auto"] | None = "auto") -> None:
        if output_fd == 1 and sys.stdout is not None:
            sys.stdout.flush()  # keep anything Python already buffered ahead of guest output
        self._output_fd = output_fd
        self._input_fd = _stdin_fd_if_not_interactive() if input_fd == "auto" else input_fd
        self._output_broken = False
        self._waker: Waker | None = None
        self._thread: threading.Thread | None = None

    @property
    def has_input(self) -> bool:
        return self._input_fd is not None

    def write(self, data: bytes) -> None:
        if self._output_broken:
            return
        try:
            written = os.write(self._output_fd, data)
            if written != len(data):
                _write_all_fd(self._output_fd, data[written:])
        except BlockingIOError:
            try:
                _write_all_fd(self._output_fd, data)
            except OSError as error:
                self._break(error)
        except OSError as error:
            self._break(error)

    def _break(self, error: OSError) -> None:
        self._output_broken = True
        log.warning("serial output to fd %d failed (%s); dropping the rest", self._output_fd, error)

    def start(self, deliver: InputSink) -> None:
        if self._input_fd is None or self._thread is not None:
            return
        self._waker = Waker()
        self._thread = threading.Thread(
            target=self._read_loop,
            args=(self._input_fd, self._waker, deliver),
            name="serial-stdin",
            daemon=True,
        )
        self._thread.start()

    @staticmethod
    def _read_loop(fd: int, waker: Waker, deliver: InputSink) -> None:
        name_host_thread()
        sandbox.enter_or_log("io")
        while waker.wait_readable(fd):
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as error:
                log.warning("serial input from fd %d failed: %s", fd, error)
                return
            if not chunk or not deliver(chunk):
                return

    def close(self) -> None:
        stop_reader(self._thread, self._waker)
        self._thread = None
        self._waker = None


def stop_reader(thread: threading.Thread | None, waker: Waker | None) -> None:
    if waker is None:
        return
    waker.wake()
    if thread is not None:
        thread.join(timeout=2.0)
        if thread.is_alive():  # still inside the device: leave its descriptors open, not pulled away
            log.warning("serial reader thread %s did not stop", thread.name)
            return
    waker.close()


class FileBackend(SerialBackend):
    """Appends guest output to a file, one unbuffered write per guest write."""

    def __init__(self, path: str, option: str = "serial") -> None:
        """``option`` names the setting in errors ("serial", "console")."""
        self.path = path
        try:
            self._fd: int | None = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )  # guest output: owner only
        except OSError as error:
            raise ConfigError(f"{option} file:{path}: cannot open for appending: {error.strerror}") from None

    def write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            written = os.write(fd, data)
            if written != len(data):
                _write_all_fd(fd, data[written:])
        except OSError as error:
            self._fd = None
            os.close(fd)
            log.warning("serial output to %s failed (%s); further guest output is dropped", self.path, error)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class SerialSpec(NamedTuple):
    """A parsed ``--serial`` value."""

    kind: SerialKind
    path: str | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_serial_spec(text: str, option: str = "serial") -> SerialSpec:
    """Parse ``stdio``, ``none``, ``file:PATH`` or ``unix:PATH``; raise ConfigError otherwise.

    ``option`` names the setting in errors: "serial" for COM1, "console" for virtio-console."""
    if text == "stdio":
        return SerialSpec("stdio")
    if text == "none":
        return SerialSpec("none")
    kind, colon, path = text.partition(":")
    if not colon or kind not in ("file", "unix"):
        raise ConfigError(f"{option} {text!r}: expected {_SPEC_FORMS}")
    if not path:
        example = "/tmp/guest.log" if kind == "file" else "/tmp/guest.sock"
        raise ConfigError(f"{option} {text!r}: {kind}: needs a path, e.g. {kind}:{example}")
    if "\0" in path:
        raise ConfigError(f"{option} {text!r}: the path contains a NUL character")
    if kind == "file":
        return SerialSpec("file", path)
    length = len(os.fsencode(path))
    if length > _UNIX_PATH_MAX:
        raise ConfigError(
            f"{option} {kind}:{path[:40]}...: socket path is {length} bytes, "
            f"over the {_UNIX_PATH_MAX} Linux allows"
        )
    return SerialSpec("unix", path)


def open_serial_backend(spec: SerialSpec | str, option: str = "serial") -> SerialBackend:
    """Create the backend a spec names (a string is parsed first); ConfigError if it cannot be opened.

    ``option`` names the setting in errors ("serial", "console")."""
    parsed = parse_serial_spec(spec, option) if isinstance(spec, str) else spec
    if parsed.kind == "stdio":
        return StdioBackend()
    if parsed.kind == "none":
        return NullBackend()
    if parsed.path is None:
        raise ConfigError(f"{option} {parsed.kind}: needs a path")
    if parsed.kind == "file":
        return FileBackend(parsed.path, option)
    from vmscope.devices.socket_backend import UnixSocketBackend  # sockets only when asked for

    return UnixSocketBackend(parsed.path, option)
