"""A blocking client for the control socket (used by ``vmscope ctl`` and ``vmscope top``)."""

from __future__ import annotations

import itertools
import json
import os
import socket
from typing import Any

from vmscope.errors import VmscopeError

#: longest response line accepted (a 1 MiB read-memory is 2 MiB of hex plus framing)
MAX_RESPONSE_BYTES = 16 << 20


class ControlError(VmscopeError):
    """The server answered ``ok: false``, or the socket could not be used."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlConnectionError(ControlError):
    """The socket is missing, refused the connection, or closed before answering."""

    def __init__(self, message: str) -> None:
        super().__init__("connection", message)


class ControlClient:
    """One connection to a control socket; ``call`` sends a request and waits for its answer."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = 30.0) -> None:
        self.path = os.fspath(path)
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as error:
            self._sock.close()
            raise ControlConnectionError(
                f"cannot connect to control socket {self.path}: {error.strerror or error}"
            ) from None

    def call(self, command: str, /, **arguments: Any) -> Any:
        """Run ``command`` with ``arguments``; its result, or ControlError with the server's message."""
        request_id = next(self._ids)
        request = {"id": request_id, "command": command, "arguments": arguments}
        response = self.request(request)
        if response.get("id") != request_id:
            raise ControlError(
                "protocol", f"{self.path}: answer for request {response.get('id')!r}, not {request_id}"
            )
        return _result_of(response)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one raw request object and return the raw response object."""
        line = json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"
        self.send_raw(line)
        return self.read_response()

    def send_raw(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as error:
            raise ControlConnectionError(f"{self.path}: sending failed: {error.strerror or error}") from None

    def read_response(self) -> dict[str, Any]:
        """The next response line as an object."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                break
            if len(self._buffer) > MAX_RESPONSE_BYTES:
                raise ControlError(
                    "protocol", f"{self.path}: response longer than {MAX_RESPONSE_BYTES} bytes"
                )
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                raise ControlConnectionError(f"{self.path}: no answer from the VMM (timed out)") from None
            except OSError as error:
                raise ControlConnectionError(
                    f"{self.path}: receiving failed: {error.strerror or error}"
                ) from None
            if not data:
                raise ControlConnectionError(f"{self.path}: the VMM closed the control connection")
            self._buffer += data
        try:
            response = json.loads(line)
        except ValueError as error:
            raise ControlError("protocol", f"{self.path}: the answer is not JSON ({error})") from None
        if not isinstance(response, dict):
            raise ControlError("protocol", f"{self.path}: the answer is not a JSON object")
        return response

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result_of(response: dict[str, Any]) -> Any:
    if response.get("ok") is True:
        return response.get("result")
    error = response.get("error")
    if isinstance(error, dict):
        code = str(error.get("code", "error"))
        raise ControlError(code, str(error.get("message", "the VMM reported an error")))
    raise ControlError("protocol", "malformed answer from the VMM (no result and no error)")
