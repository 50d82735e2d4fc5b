"""The control socket: query and drive a running machine over line-delimited JSON.

Names are imported on first use, so that the client (``vmscope ctl``, ``vmscope top``) does
not load the server and the machine behind it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.lazy_exports import lazy_exports

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

EXPORTS = {
    "ControlClient": ".client",
    "ControlConnectionError": ".client",
    "ControlError": ".client",
    "COMMANDS": ".server",
    "MAX_READ_LENGTH": ".server",
    "MAX_REQUEST_BYTES": ".server",
    "ControlProtocol": ".server",
    "ControlServer": ".server",
    "attach_control_server": ".server",
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


__getattr__ = lazy_exports(__name__, EXPORTS)
