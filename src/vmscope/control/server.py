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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from vmscope import sandbox
from vmscope.errors import ConfigError, GuestMemoryError, KvmError, PageFault, VmscopeError
from vmscope.host_thread import name_host_thread
from vmscope.profiler.histogram import LatencyHistogram

if TYPE_CHECKING:
    from vmscope.profiler.model import Profile
    from vmscope.profiler.recorder import ProfileRecorder
    from vmscope.vmm.machine import Machine

log = logging.getLogger("vmscope.control")

#: longest request line accepted (bytes, without the newline)
MAX_REQUEST_BYTES = 1 << 20
#: most bytes one read-memory may return
MAX_READ_LENGTH = 1 << 20
#: output queued for a client past which its further requests wait until it reads
OUTPUT_HIGH_WATER = 4 << 20
#: concurrent clients; more are told so and disconnected
MAX_CLIENTS = 64
_RECV_SIZE = 1 << 16
_SEND_SIZE = 1 << 18

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
        "vCPUs, KVM backend, guest kind and image",
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


# --------------------------------------------------------------------------------------------------
# the commands


def _histogram_summary(histogram: LatencyHistogram) -> dict[str, Any]:
    return {
        "count": histogram.count,
        "total_ns": histogram.sum,
        "min_ns": histogram.min,
        "max_ns": histogram.max,
        "mean_ns": round(histogram.mean, 1),
        "p50_ns": histogram.percentile(50),
        "p99_ns": histogram.percentile(99),
    }


class ControlProtocol:
    """Turns request lines into response lines for one machine (no sockets here)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._recorder: ProfileRecorder | None = None
        self._profile: Profile | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], object]] = {
            "help": self._help,
            "query-status": self._query_status,
            "pause": self._pause,
            "resume": self._resume,
            "quit": self._quit,
            "query-stats": self._query_stats,
            "profile-start": self._profile_start,
            "profile-stop": self._profile_stop,
            "profile-dump": self._profile_dump,
            "read-memory": self._read_memory,
            "read-registers": self._read_registers,
        }

    def handle_line(self, line: bytes) -> bytes:
        """The response line for one request line; never raises."""
        try:
            request = parse_request(line)
        except _RequestLineError as error:
            return encode_response(error.request_id, error=(error.code, error.message))
        try:
            result = self._handlers[request.command.name](request.arguments)
        except ControlRequestError as error:
            return encode_response(request.id, error=(error.code, error.message))
        except PageFault as error:
            return encode_response(request.id, error=("page-fault", str(error)))
        except GuestMemoryError as error:
            return encode_response(request.id, error=("memory-error", str(error)))
        except KvmError as error:
            return encode_response(request.id, error=("kvm-error", str(error)))
        except ConfigError as error:
            return encode_response(request.id, error=("invalid-argument", str(error)))
        except VmscopeError as error:
            return encode_response(request.id, error=("failed", str(error)))
        except Exception as error:  # a VMM bug must answer the client, not kill the server thread
            log.exception("control command %s failed", request.command.name)
            return encode_response(request.id, error=("internal-error", f"{type(error).__name__}: {error}"))
        try:
            return encode_response(request.id, result)
        except (TypeError, ValueError) as error:
            log.error("control command %s returned an unencodable result: %s", request.command.name, error)
            return encode_response(request.id, error=("internal-error", f"result not encodable: {error}"))

    def close(self) -> None:
        """End a recording still running so its hooks and sampler leave the machine."""
        if self._recorder is not None:
            try:
                self._finish_recording()
            except Exception:
                log.exception("finishing the control socket's profile recording failed")

    # -- state helpers ------------------------------------------------------------------------

    def _started(self) -> bool:
        return any(runner.thread is not None for runner in self.machine.runners)

    def _all_paused(self) -> bool:
        """Every live vCPU is held by a pause that nobody has lifted yet."""
        return all(
            runner.exited.is_set() or (runner.pause_requested and runner.paused.is_set())
            for runner in self.machine.runners
        )

    def state(self) -> str:
        if not self._started():
            return "created"
        if not self.machine.running:
            return "stopped"
        return "paused" if self._all_paused() else "running"

    def _require_running(self, command: str) -> None:
        state = self.state()
        if state in ("created", "stopped"):
            raise ControlRequestError("not-running", f"{command}: the VM is {state}, not running")

    @contextlib.contextmanager
    def _vcpus_held(self) -> Iterator[None]:
        """Keep every vCPU out of KVM_RUN inside the block; resume afterwards only if we paused."""
        machine = self.machine
        if not machine.running or self._all_paused():
            yield
            return
        try:
            machine.pause()
        except BaseException:
            machine.resume()  # do not leave the vCPUs that did pause held
            raise
        try:
            yield
        finally:
            machine.resume()

    def _check_vcpu(self, index: int) -> None:
        if index >= len(self.machine.runners):
            raise ControlRequestError(
                "invalid-argument", f"vcpu {index} does not exist (the VM has {len(self.machine.runners)})"
            )

    # -- handlers -----------------------------------------------------------------------------

    def _help(self, arguments: dict[str, Any]) -> object:
        return {
            "commands": [
                {
                    "name": command.name,
                    "description": command.description,
                    "arguments": {argument.name: argument.schema() for argument in command.arguments},
                }
                for command in COMMANDS
            ]
        }

    def _query_status(self, arguments: dict[str, Any]) -> object:
        machine = self.machine
        state = self.state()
        result = machine.result()
        guest = machine.guest
        status: dict[str, Any] = {
            "state": state,
            "uptime_s": round(result.duration_s, 6),
            "cpus": machine.cpu_count,
            "kvm_backend": machine.kvm.backend,
            "guest_kind": guest.kind if guest is not None else None,
            "guest_image": str(guest.symbol_file) if guest is not None and guest.symbol_file else None,
            "profiling": self._recorder is not None,
        }
        if state == "stopped":
            status["exit_status"] = result.exit_status
            status["reason"] = result.reason
            status["crash"] = result.crash.format() if result.crash is not None else None
        return status

    def _pause(self, arguments: dict[str, Any]) -> object:
        self._require_running("pause")
        self.machine.pause()
        return {"state": self.state()}

    def _resume(self, arguments: dict[str, Any]) -> object:
        self._require_running("resume")
        self.machine.resume()
        return {"state": self.state()}

    def _quit(self, arguments: dict[str, Any]) -> object:
        if self.state() == "stopped":
            raise ControlRequestError("not-running", "quit: the VM has already stopped")
        self.machine.request_stop("quit via control socket", 0)
        return {"stopping": True}

    def _exit_row(self, key: int, histogram: LatencyHistogram) -> dict[str, Any]:
        from vmscope.profiler.recorder import exit_detail
        from vmscope.vmm.runner import decode_exit_key

        reason, address, access = decode_exit_key(key)
        device = None
        if reason == "IO":
            device = self.machine.device_name_at("pio", address)
        elif reason == "MMIO":
            device = self.machine.device_name_at("mmio", address)
        detail = exit_detail(reason, address, access)
        return {
            "key": f"{reason} {detail}".rstrip(),
            "reason": reason,
            "address": address if address >= 0 else None,
            "access": access or None,
            "detail": detail,
            "device": device,
            **_histogram_summary(histogram),
        }

    def _query_stats(self, arguments: dict[str, Any]) -> object:
        machine = self.machine
        sampled_ns = time.monotonic_ns()
        totals: dict[int, LatencyHistogram] = {}
        vcpus = []
        total_guest_ns = 0
        for runner in machine.runners:
            stats = runner.stats
            # list() of a dict's items is one C call under the GIL: a consistent copy even while
            # the vCPU thread adds keys
            handling = list(stats.handling.items())
            rows = []
            for key, live in handling:
                histogram = live.copy()
                rows.append(self._exit_row(key, histogram))
                totals.setdefault(key, LatencyHistogram()).merge(histogram)
            rows.sort(key=lambda row: (-row["count"], row["key"]))
            guest_ns = stats.guest.sum
            total_guest_ns += guest_ns
            vcpus.append(
                {
                    "vcpu": runner.vcpu.id,
                    "exits": sum(row["count"] for row in rows),
                    "handling_ns": sum(row["total_ns"] for row in rows),
                    "guest_ns": guest_ns,
                    "kicks": stats.kicks,
                    "exit_keys": rows,
                }
            )
        total_rows = [self._exit_row(key, histogram) for key, histogram in totals.items()]
        total_rows.sort(key=lambda row: (-row["count"], row["key"]))
        unclaimed: dict[str, list[dict[str, int]]] = {}
        for space, bus in (("pio", machine.pio_bus), ("mmio", machine.mmio_bus)):
            merged: dict[tuple[int, int], dict[str, int]] = {}
            for field_name, counter in (("reads", bus.unclaimed_reads), ("writes", bus.unclaimed_writes)):
                for (address, size), count in list(counter.items()):
                    entry = merged.setdefault(
                        (address, size), {"address": address, "size": size, "reads": 0, "writes": 0}
                    )
                    entry[field_name] = count
            unclaimed[space] = [merged[place] for place in sorted(merged)]
        result: dict[str, Any] = {
            "state": self.state(),
            "uptime_s": round(machine.result().duration_s, 6),
            "sampled_ns": sampled_ns,
            "vcpus": vcpus,
            "totals": {
                "exits": sum(row["count"] for row in total_rows),
                "handling_ns": sum(row["total_ns"] for row in total_rows),
                "guest_ns": total_guest_ns,
                "exit_keys": total_rows,
            },
            "unclaimed": unclaimed,
        }
        if arguments["kvm"]:
            try:
                result["kvm"] = machine.kvm_stats()
            except (VmscopeError, OSError, ValueError) as error:
                result["kvm"] = {}
                result["kvm_error"] = str(error)
        return result

    def _profile_start(self, arguments: dict[str, Any]) -> object:
        from vmscope.profiler.recorder import ProfileRecorder

        if self._recorder is not None:
            raise ControlRequestError("profile-active", "profile-start: a profile is already being recorded")
        if self.state() == "stopped":
            raise ControlRequestError("not-running", "profile-start: the VM has stopped")
        if any(runner.on_kick is not None for runner in self.machine.runners):
            raise ControlRequestError("busy", "profile-start: another profiler is attached to this VM")
        recorder = ProfileRecorder(
            self.machine,
            frequency_hz=float(arguments["frequency_hz"]),
            exit_samples=arguments["exit_samples"],
        )
        with self._vcpus_held():  # hooks and sync-regs change only while no vCPU is in KVM_RUN
            recorder.start()
        self._recorder = recorder
        self._profile = None
        return {"recording": True, "frequency_hz": recorder.frequency_hz}

    def _finish_recording(self) -> Profile:
        recorder = self._recorder
        assert recorder is not None
        with self._vcpus_held():
            profile = recorder.finish()
        self._recorder = None
        self._profile = profile
        return profile

    def _profile_summary(self, profile: Profile) -> dict[str, Any]:
        return {
            "samples": len(profile.samples),
            "exit_stats": len(profile.exit_stats),
            "duration_s": round(profile.metadata.duration_ns / 1e9, 6),
        }

    def _profile_stop(self, arguments: dict[str, Any]) -> object:
        if self._recorder is None:
            raise ControlRequestError(
                "no-profile", "profile-stop: no recording is running (use profile-start)"
            )
        return self._profile_summary(self._finish_recording())

    def _profile_dump(self, arguments: dict[str, Any]) -> object:
        from vmscope.profiler import profile_file

        path = arguments["path"]
        if not path or "\0" in path:
            raise ControlRequestError(
                "invalid-argument", "profile-dump: 'path' must be a non-empty file name"
            )
        if self._recorder is not None:
            profile = self._finish_recording()
        elif self._profile is not None:
            profile = self._profile
        else:
            raise ControlRequestError(
                "no-profile", "profile-dump: no profile was recorded (use profile-start)"
            )
        full_path = os.path.abspath(path)
        profile_file.save(profile, full_path)
        return {"path": full_path, "bytes": os.path.getsize(full_path), **self._profile_summary(profile)}

    def _read_memory(self, arguments: dict[str, Any]) -> object:
        address: int = arguments["address"]
        length: int = arguments["length"]
        vcpu_index: int = arguments["vcpu"]
        memory = self.machine.memory
        try:
            if arguments["virtual"]:
                from vmscope.memory.paging import PagingMode, read_virtual, translate

                self._check_vcpu(vcpu_index)
                with self._vcpus_held():
                    sregs = self.machine.runners[vcpu_index].vcpu.get_sregs()
                mode = PagingMode(cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer)
                physical = translate(memory, mode, address)
                data = read_virtual(memory, mode, address, length)
            else:
                physical = address
                data = memory.read(address, length)
        except ValueError as error:  # the mapping is gone: the machine was closed
            raise ControlRequestError(
                "not-running", f"read-memory: guest memory is unavailable ({error})"
            ) from None
        return {
            "address": address,
            "physical_address": physical,
            "length": len(data),
            "virtual": arguments["virtual"],
            "data": data.hex(),
        }

    def _read_registers(self, arguments: dict[str, Any]) -> object:
        vcpu_index: int = arguments["vcpu"]
        self._check_vcpu(vcpu_index)
        vcpu = self.machine.runners[vcpu_index].vcpu
        with self._vcpus_held():
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
        result: dict[str, Any] = {"vcpu": vcpu.id}
        for name, *_ in regs._fields_:
            result[name] = int(getattr(regs, name))
        segments = {}
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            segment = getattr(sregs, name)
            segments[name] = {
                "selector": int(segment.selector),
                "base": int(segment.base),
                "limit": int(segment.limit),
            }
        result["segments"] = segments
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            result[name] = int(getattr(sregs, name))
        if sregs.efer & (1 << 10) and sregs.cs.l:
            result["mode"] = "long"
        elif sregs.cr0 & 1:
            result["mode"] = "protected"
        else:
            result["mode"] = "real"
        return result


# --------------------------------------------------------------------------------------------------
# the socket


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


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _bind_private_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at ``path`` that only its owner can connect to, with its (dev, inode)."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ConfigError(f"control socket {path}: {error.strerror or error}") from None
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigError(
                f"control socket {path}: the path exists and is not a socket; refusing to replace it"
            )
        if _socket_is_live(path):
            raise ConfigError(f"control socket {path}: another process is listening there")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: nobody listens on it any more
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket inode's mode (minus the umask), so the
        # file is 0600 from the moment it exists; the checks below hold before listen() anyway.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        created = os.lstat(path)
        if not stat.S_ISSOCK(created.st_mode):
            raise ConfigError(f"control socket {path}: replaced by something else while it was created")
        if stat.S_IMODE(created.st_mode) != 0o600:
            os.chmod(path, 0o600)
            created = os.lstat(path)
            if stat.S_IMODE(created.st_mode) != 0o600:
                raise ConfigError(f"control socket {path}: cannot restrict its mode to 0600")
        sock.listen(64)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise ConfigError(f"control socket {path}: {error.strerror or error}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (created.st_dev, created.st_ino)


class ControlServer:
    """Serves the control protocol for ``machine`` on the UNIX socket ``path``."""

    def __init__(self, machine: Machine, path: str | os.PathLike[str]) -> None:
        self.machine = machine
        self.path = os.fspath(path)
        self.protocol = ControlProtocol(machine)
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
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
        if self._identity is None:
            return
        try:
            current = os.lstat(self.path)
        except OSError:
            return
        if (current.st_dev, current.st_ino) == self._identity:  # never remove someone else's file
            with contextlib.suppress(OSError):
                os.unlink(self.path)

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
