"""The ``unix:PATH`` serial backend: the VMM listens on a UNIX stream socket and serves one client
at a time (see :mod:`vmscope.devices.char_backends` for the other backends and the spec syntax).

A module of its own so that a guest with a terminal or file console does not import sockets.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

from vmscope import sandbox
from vmscope.devices.char_backends import READ_CHUNK, InputSink, SerialBackend, Waker, stop_reader
from vmscope.host_thread import name_host_thread
from vmscope.unix_socket import listen_unix, remove_socket_file

# how long a guest write may wait for a connected socket client that is not reading
_SOCKET_SEND_PATIENCE_S = 0.25


class UnixSocketBackend(SerialBackend):
    """A listening UNIX stream socket; one client at a time sees output and provides input.

    Output while no client is connected is dropped and counted in :attr:`dropped_bytes`. A
    connected client that stops reading delays one guest write by at most a quarter second;
    from then on output that does not fit in the socket buffer is dropped at once, until a
    write goes through whole again: the guest must never stall on a client.
    """

    def __init__(self, path: str, option: str = "serial") -> None:
        """``option`` names the setting in errors ("serial", "console")."""
        self.path = path
        self.dropped_bytes = 0
        # owner only, like the control socket: the guest's console is no one else's business
        self._listener, self._identity = listen_unix(path, f"{option} unix:{path}", backlog=1, private=True)
        self._client: socket.socket | None = None
        self._congested = False  # the last write timed out; do not wait for this client again
        self._connected = threading.Event()
        self._stopping = False
        self._waker: Waker | None = None
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    def wait_connected(self, timeout: float) -> bool:
        """Wait until a client is being served (for callers that must not lose early output)."""
        return self._connected.wait(timeout)

    def start(self, deliver: InputSink) -> None:
        if self._thread is not None:
            return
        self._waker = Waker()
        self._thread = threading.Thread(
            target=self._serve, args=(self._waker, deliver), name=f"serial-unix:{self.path}", daemon=True
        )
        self._thread.start()

    def _serve(self, waker: Waker, deliver: InputSink) -> None:
        name_host_thread()
        sandbox.enter_or_log("control")  # accepts clients on its listening socket
        listener = self._listener
        while not self._stopping and waker.wait_readable(listener.fileno()):
            try:
                client, _ = listener.accept()
            except OSError:  # the client gave up between poll and accept
                continue
            self._client = client
            self._congested = False
            self._connected.set()
            try:
                self._pump(client, waker, deliver)
            finally:
                self._connected.clear()
                self._client = None
                client.close()

    def _pump(self, client: socket.socket, waker: Waker, deliver: InputSink) -> None:
        while waker.wait_readable(client.fileno()):
            try:
                chunk = client.recv(READ_CHUNK)
            except OSError:
                return
            if not chunk:
                return
            if not deliver(chunk):
                self._stopping = True
                return

    def write(self, data: bytes) -> None:
        client = self._client
        if client is None:
            self.dropped_bytes += len(data)
            return
        try:
            sent = client.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._hang_up(client)
            self.dropped_bytes += len(data)
            return
        if sent == len(data):
            self._congested = False
        elif self._congested:
            self.dropped_bytes += len(data) - sent
        else:
            self._send_rest(client, memoryview(data)[sent:])

    def _send_rest(self, client: socket.socket, rest: memoryview) -> None:
        deadline = time.monotonic() + _SOCKET_SEND_PATIENCE_S
        while rest:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                _, writable, _ = select.select([], [client], [], remaining)
                if writable:
                    rest = rest[client.send(rest, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) :]
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                self._hang_up(client)
                break
        if rest:
            self._congested = True
            self.dropped_bytes += len(rest)

    @staticmethod
    def _hang_up(client: socket.socket) -> None:
        """Shut a dead client down; the serving thread sees EOF and closes it."""
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopping = True
        stop_reader(self._thread, self._waker)
        self._thread = None
        self._waker = None
        client = self._client
        if client is not None:
            self._hang_up(client)
        self._listener.close()
        remove_socket_file(self.path, self._identity)
