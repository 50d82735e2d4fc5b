"""The control protocol's wire format: request lines, argument schemas, response lines.

Pure data and validation, no machine and no socket: what a client may send (``COMMANDS``, each
with typed, range-checked arguments), how a request line is parsed and how a response line is
encoded. See :mod:`vmscope.control.server` for the protocol as a whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from vmscope.errors import VmscopeError

#: longest request line accepted (bytes, without the newline)
MAX_REQUEST_BYTES = 1 << 20
#: most bytes one read-memory may return
MAX_READ_LENGTH = 1 << 20

ArgumentType = Literal["integer", "number", "boolean", "string"]


class ControlRequestError(VmscopeError):
    """A request that cannot be carried out; becomes an ``ok: false`` response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Argument:
    """One named argument of a command, as validated and as listed by ``help``."""

    name: str
    type: ArgumentType
    description: str
    required: bool = False
    default: object = None
    minimum: int | float | None = None
    maximum: int | float | None = None

    def schema(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "type": self.type,
            "required": self.required,
            "description": self.description,
        }
        if not self.required:
            described["default"] = self.default
        if self.minimum is not None:
            described["minimum"] = self.minimum
        if self.maximum is not None:
            described["maximum"] = self.maximum
        return described

    def check(self, command: str, value: object) -> object:
        """``value`` if it has this argument's type and range, else ControlRequestError."""
        where = f"{command}: argument {self.name!r}"
        if self.type == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ControlRequestError(
                    "invalid-argument", f"{where} must be an integer, not {_json_type(value)}"
                )
        elif self.type == "number":
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ControlRequestError(
                    "invalid-argument", f"{where} must be a number, not {_json_type(value)}"
                )
        elif self.type == "boolean":
            if not isinstance(value, bool):
                raise ControlRequestError(
                    "invalid-argument", f"{where} must be true or false, not {_json_type(value)}"
                )
        elif not isinstance(value, str):
            raise ControlRequestError(
                "invalid-argument", f"{where} must be a string, not {_json_type(value)}"
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                raise ControlRequestError(
                    "invalid-argument", f"{where} is {value}, below the minimum {self.minimum}"
                )
            if self.maximum is not None and value > self.maximum:
                raise ControlRequestError(
                    "invalid-argument", f"{where} is {value}, above the maximum {self.maximum}"
                )
        return value


@dataclass(frozen=True)
class Command:
    name: str
    description: str
    arguments: tuple[Argument, ...] = ()

    def validate(self, arguments: object) -> dict[str, Any]:
        """The arguments with defaults filled in; unknown, missing or mistyped ones are refused."""
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ControlRequestError(
                "invalid-request", f"{self.name}: 'arguments' must be an object, not {_json_type(arguments)}"
            )
        known = {argument.name: argument for argument in self.arguments}
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise ControlRequestError(
                "invalid-argument", f"{self.name}: unknown argument {unknown[0]!r} (accepted: {accepted})"
            )
        values: dict[str, Any] = {}
        for name, argument in known.items():
            if name in arguments:
                values[name] = argument.check(self.name, arguments[name])
            elif argument.required:
                raise ControlRequestError(
                    "invalid-argument", f"{self.name}: missing required argument {name!r}"
                )
            else:
                values[name] = argument.default
        return values


_VCPU = Argument("vcpu", "integer", "vCPU index", default=0, minimum=0)

COMMANDS: tuple[Command, ...] = (
    Command("help", "list the commands and their arguments"),
    Command(
        "query-status",
        "state (created, running, paused, stopped), exit status and reason once stopped, uptime, "
        "vCPUs, KVM backend, guest kind and image, instructions vmscope completed for KVM",
    ),
    Command("pause", "hold every vCPU outside the guest"),
    Command("resume", "let paused vCPUs run again"),
    Command("quit", "stop the VM with exit status 0"),
    Command(
        "query-stats",
        "exit counts and handling-time statistics per vCPU and exit key, totals, accesses no device "
        "claimed, and KVM's binary statistics",
        (Argument("kvm", "boolean", "include KVM's binary statistics", default=True),),
    ),
    Command(
        "profile-start",
        "start recording a profile (exit samples and time samples)",
        (
            Argument(
                "frequency_hz",
                "number",
                "time samples per second per vCPU",
                default=99.0,
                minimum=0,
                maximum=20000,
            ),
            Argument("exit_samples", "boolean", "sample the guest stack at VM exits", default=True),
        ),
    ),
    Command("profile-stop", "stop recording; the profile stays available to profile-dump"),
    Command(
        "profile-dump",
        "write the profile started by profile-start to a file (stops the recording first if it is running)",
        (
            Argument(
                "path", "string", "file to write, absolute or relative to the VMM's directory", required=True
            ),
        ),
    ),
    Command(
        "read-memory",
        "read guest memory; returns the bytes as a hex string",
        (
            Argument(
                "address",
                "integer",
                "guest-physical or (virtual=true) guest-linear address",
                required=True,
                minimum=0,
                maximum=(1 << 64) - 1,
            ),
            Argument("length", "integer", "bytes to read", required=True, minimum=1, maximum=MAX_READ_LENGTH),
            Argument(
                "virtual", "boolean", "translate the address through the vCPU's page tables", default=False
            ),
            _VCPU,
        ),
    ),
    Command(
        "snapshot",
        "save the VM's complete state to a snapshot directory (vmscope run --restore PATH continues it); "
        "the vCPUs are paused and in-flight I/O finished first, then the VM resumes or, with stop, ends",
        (
            Argument(
                "path",
                "string",
                "snapshot directory, absolute or relative to the VMM's directory",
                required=True,
            ),
            Argument(
                "stop", "boolean", "end the run (status 0) after saving instead of resuming", default=False
            ),
        ),
    ),
    Command(
        "read-registers",
        "general registers, rip, rflags, segments and control registers of one vCPU",
        (_VCPU,),
    ),
)
COMMANDS_BY_NAME = {command.name: command for command in COMMANDS}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def encode_response(request_id: object, result: object = None, error: tuple[str, str] | None = None) -> bytes:
    """One response line (with its newline)."""
    message: dict[str, Any] = {"id": request_id}
    if error is None:
        message["ok"] = True
        message["result"] = result
    else:
        message["ok"] = False
        message["error"] = {"code": error[0], "message": error[1]}
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


@dataclass
class Request:
    id: object
    command: Command
    arguments: dict[str, Any]


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line. Errors carry the request id when one was readable."""
    try:
        document = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise _RequestLineError(None, "parse-error", "request is not UTF-8 text") from None
    except RecursionError:
        raise _RequestLineError(None, "parse-error", "request is nested too deeply") from None
    except ValueError as error:
        raise _RequestLineError(None, "parse-error", f"request is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise _RequestLineError(
            None, "invalid-request", f"a request must be a JSON object, not {_json_type(document)}"
        )
    request_id = document.get("id")
    extra = sorted(set(document) - {"id", "command", "arguments"})
    if extra:
        raise _RequestLineError(
            request_id,
            "invalid-request",
            f"unknown request field {extra[0]!r} (expected id, command, arguments)",
        )
    name = document.get("command")
    if not isinstance(name, str):
        raise _RequestLineError(
            request_id, "invalid-request", f"'command' must be a string, not {_json_type(name)}"
        )
    command = COMMANDS_BY_NAME.get(name)
    if command is None:
        known = ", ".join(COMMANDS_BY_NAME)
        raise _RequestLineError(request_id, "unknown-command", f"unknown command {name!r} (known: {known})")
    try:
        arguments = command.validate(document.get("arguments"))
    except ControlRequestError as error:
        raise _RequestLineError(request_id, error.code, error.message) from None
    return Request(request_id, command, arguments)


class _RequestLineError(Exception):
    def __init__(self, request_id: object, code: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.code = code
        self.message = message
