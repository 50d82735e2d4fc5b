"""The control socket: a line-delimited JSON protocol to query and drive a running machine.

Each request is one line holding a JSON object::

    {"id": 7, "command": "read-memory", "arguments": {"address": 31744, "length": 16}}

and gets exactly one response line, in order::

    {"id": 7, "ok": true, "result": {...}}
    {"id": 7, "ok": false, "error": {"code": "invalid-argument", "message": "..."}}

The socket is a UNIX stream socket readable and writable by its owner only (mode 0600). One
server thread multiplexes every client with ``selectors`` and runs the commands itself, so
the vCPU threads never wait for a client: the server only reads counters the vCPU loop
updates and takes no lock that loop takes. Commands that need register state (virtual
reads, registers, attaching the profiler) pause the vCPUs for the duration and resume them.

Layout: :mod:`vmscope.control.schema` is the wire format (commands, arguments, request and
response lines), :mod:`vmscope.control.handlers` runs commands on a machine
(:class:`ControlProtocol`), and this module is the socket server; it re-exports the other two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from typing import TYPE_CHECKING

from vmscope import sandbox
from vmscope.control.handlers import ControlProtocol
from vmscope.control.schema import (
    COMMANDS,
    COMMANDS_BY_NAME,
    MAX_READ_LENGTH,
    MAX_REQUEST_BYTES,
    Argument,
    Command,
    ControlRequestError,
    Request,
    encode_response,
    parse_request,
)
from vmscope.errors import ConfigError
from vmscope.host_thread import name_host_thread
from vmscope.unix_socket import SocketIdentity, listen_unix, remove_socket_file

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine

#: the protocol's parts live in schema (wire format) and handlers (commands); re-exported here
__all__ = [
    "COMMANDS",
    "COMMANDS_BY_NAME",
    "MAX_CLIENTS",
    "MAX_READ_LENGTH",
    "MAX_REQUEST_BYTES",
    "OUTPUT_HIGH_WATER",
    "Argument",
    "Command",
    "ControlProtocol",
    "ControlRequestError",
    "ControlServer",
    "Request",
    "attach_control_server",
    "encode_response",
    "parse_request",
]

log = logging.getLogger("vmscope.control")

#: output queued for a client past which its further requests wait until it reads
OUTPUT_HIGH_WATER = 4 << 20
#: concurrent clients; more are told so and disconnected
MAX_CLIENTS = 64
_RECV_SIZE = 1 << 16
_SEND_SIZE = 1 << 18


class _Client:
    __slots__ = ("discarding", "eof", "inbound", "outbound", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbound = bytearray()
        self.outbound = bytearray()
        #: inside a line that was already refused as too long: drop bytes up to its newline
        self.discarding = False
        #: the client sent EOF: answer what it sent, then close
        self.eof = False


def _bind_private_socket(path: str) -> tuple[socket.socket, SocketIdentity]:
    """A non-blocking listening socket at ``path`` that only its owner can connect to, with its identity."""
    sock, identity = listen_unix(path, f"control socket {path}", backlog=64, private=True)
    sock.setblocking(False)
    return sock, identity


class ControlServer:
    """Serves the control protocol for ``machine`` on the UNIX socket ``path``."""

    def __init__(self, machine: Machine, path: str | os.PathLike[str]) -> None:
        self.machine = machine
        self.path = os.fspath(path)
        self.protocol = ControlProtocol(machine)
        self._listener: socket.socket | None = None
        self._identity: SocketIdentity | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_read: socket.socket | None = None
        self._wake_write: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def start(self) -> None:
        """Create the socket and start the server thread."""
        if self._thread is not None:
            raise ConfigError("this control server was already started")
        self._listener, self._identity = _bind_private_socket(self.path)
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="vmscope-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, disconnect every client and remove the socket file."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._wake_write is not None:
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for client in list(self._clients.values()):
            self._drop(client)
        for sock in (self._listener, self._wake_read, self._wake_write):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._remove_socket_file()
        self.protocol.close()

    def _remove_socket_file(self) -> None:
        remove_socket_file(self.path, self._identity)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        name_host_thread()
        try:
            sandbox.enter("control")
        except ConfigError as error:
            log.error("control socket: %s", error)
            return
        selector = self._selector
        assert selector is not None
        while not self._closing.is_set():
            try:
                events = selector.select()
            except OSError:
                if not self._closing.is_set():
                    log.exception("control socket: select failed; the server stops")
                return
            for key, mask in events:
                if self._closing.is_set():
                    return
                if key.data == "listener":
                    self._accept()
                elif key.data == "wake":
                    continue  # close() woke us; the loop condition ends the thread
                else:
                    client: _Client = key.data
                    if client.sock.fileno() < 0:
                        continue
                    try:
                        if mask & selectors.EVENT_READ:
                            self._receive(client)
                        elif mask & selectors.EVENT_WRITE:
                            self._pump(client)
                    except Exception:  # one client's trouble must not end the server
                        log.exception("control client failed; disconnecting it")
                        self._drop(client)

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("control socket: accept failed: %s", error)
                return
            if len(self._clients) >= MAX_CLIENTS:
                with contextlib.suppress(OSError):
                    sock.send(encode_response(None, error=("too-many-clients", "too many control clients")))
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock)
            self._clients[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if data:
            client.inbound += data
        else:
            client.eof = True
        self._pump(client)

    def _pump(self, client: _Client) -> None:
        """Answer complete lines and send answers until the socket would block or input runs out."""
        while True:
            self._process(client)
            if not self._send(client):
                return  # dropped
            if client.outbound or client.inbound.find(b"\n") < 0:
                break
        if client.eof:
            if client.inbound.find(b"\n") < 0:
                client.inbound.clear()  # a request cut off by the disconnect: ignored
            if not client.outbound and not client.inbound:
                self._drop(client)
                return
        events = 0
        if not client.eof and len(client.outbound) < OUTPUT_HIGH_WATER:
            events |= selectors.EVENT_READ
        if client.outbound:
            events |= selectors.EVENT_WRITE
        assert self._selector is not None
        if events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(client.sock, events, client)
        else:
            self._drop(client)

    def _process(self, client: _Client) -> None:
        """Answer complete lines while the client reads its answers (a bounded output queue)."""
        inbound = client.inbound
        while len(client.outbound) < OUTPUT_HIGH_WATER:
            newline = inbound.find(b"\n")
            if newline < 0:
                break
            line = bytes(inbound[:newline])
            del inbound[: newline + 1]
            if client.discarding:
                client.discarding = False  # the end of a line already refused as too long
                continue
            if len(line) > MAX_REQUEST_BYTES:
                client.outbound += self._too_long()
                continue
            line = line.strip()
            if line:
                client.outbound += self.protocol.handle_line(line)
        if inbound.find(b"\n") < 0:
            if client.discarding:
                inbound.clear()
            elif len(inbound) > MAX_REQUEST_BYTES:
                client.outbound += self._too_long()
                client.discarding = True
                inbound.clear()

    @staticmethod
    def _too_long() -> bytes:
        return encode_response(
            None, error=("line-too-long", f"request line longer than {MAX_REQUEST_BYTES} bytes; ignored")
        )

    def _send(self, client: _Client) -> bool:
        """Send what the socket takes now; False when the client went away."""
        outbound = client.outbound
        while outbound:
            try:
                sent = client.sock.send(outbound[:_SEND_SIZE], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # the client went away mid-response
                self._drop(client)
                return False
            del outbound[:sent]
        return True

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self._clients.pop(fd, None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(client.sock)
        client.sock.close()


def attach_control_server(machine: Machine, path: str | os.PathLike[str]) -> ControlServer:
    """Serve the control protocol for ``machine`` at ``path`` (``--control PATH``).

    Close the server before closing the machine.
    """
    server = ControlServer(machine, path)
    server.start()
    return server
