"""The control socket: query and drive a running machine over line-delimited JSON.

Names are imported on first use, so that the client (``vmscope ctl``, ``vmscope top``) does
not load the server and the machine behind it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmscope.control.client import ControlClient, ControlConnectionError, ControlError
    from vmscope.control.server import (
        COMMANDS,
        MAX_READ_LENGTH,
        MAX_REQUEST_BYTES,
        ControlProtocol,
        ControlServer,
        attach_control_server,
    )

_EXPORTS = {
    "ControlClient": "client",
    "ControlConnectionError": "client",
    "ControlError": "client",
    "COMMANDS": "server",
    "MAX_READ_LENGTH": "server",
    "MAX_REQUEST_BYTES": "server",
    "ControlProtocol": "server",
    "ControlServer": "server",
    "attach_control_server": "server",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmscope.control' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vmscope.control.{module}"), name)
