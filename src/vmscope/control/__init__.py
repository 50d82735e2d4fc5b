"""The control socket: query and drive a running machine over line-delimited JSON."""

from vmscope.control.client import ControlClient, ControlConnectionError, ControlError
from vmscope.control.server import (
    COMMANDS,
    MAX_READ_LENGTH,
    MAX_REQUEST_BYTES,
    ControlProtocol,
    ControlServer,
    attach_control_server,
)

__all__ = [
    "COMMANDS",
    "MAX_READ_LENGTH",
    "MAX_REQUEST_BYTES",
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
    "ControlProtocol",
    "ControlServer",
    "attach_control_server",
]
