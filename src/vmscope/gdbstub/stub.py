"""A GDB remote-protocol server for a running :class:`~vmscope.vmm.machine.Machine`.

Usage (what ``vmscope run --gdb tcp:127.0.0.1:1234`` does)::

    stub = attach_gdb_stub(machine, "tcp:127.0.0.1:1234", wait_for_client=True)
    result = machine.run()
    stub.close()

How it stops and starts the guest
    "Stopped", for gdb, means every vCPU thread is parked in the runner's pause (outside
    KVM_RUN), where the server thread may read and write registers with ioctls. A breakpoint
    or single-step ends KVM_RUN with KVM_EXIT_DEBUG; the runner calls
    :meth:`GdbStub._on_debug_exit` on that vCPU's thread, which records the stop and asks
    every vCPU, itself included, to pause. The vCPU thread then blocks in the pause until gdb
    continues or steps. Ctrl-C (0x03 on the socket), a client connecting to a running VM and
    ``wait_for_client`` (pausing before the first KVM_RUN) use the same pause.

Breakpoints
    All breakpoints, Z0 included, are hardware breakpoints in DR0-DR3/DR7 programmed through
    KVM_SET_GUEST_DEBUG (GUESTDBG_USE_HW_BP), so at most four breakpoints and watchpoints
    together. Software breakpoints (int3 with GUESTDBG_USE_SW_BP) would also need guest
    memory patching, and on PVM hosts they end the run with an emulation failure, so the
    stub answers Z0 with a debug register and never writes 0xCC into the guest.
    Watchpoints (Z2 write, Z3 read — x86 can only watch reads together with writes — and Z4
    access) use the same registers. PVM runs CPL0 code in KVM's instruction emulator, which
    checks execute breakpoints but never data breakpoints, so on a kvm_pvm host Z2-Z4 are
    answered as unsupported; there ``set can-use-hw-watchpoints 0`` makes gdb watch by
    single-stepping, which works.

Resuming from a breakpoint
    The stub never relies on EFLAGS.RF: PVM ignores it, so a vCPU resumed at an armed
    execute breakpoint would stop there again forever. A vCPU that is continued while its
    rip is on one of the breakpoints first single-steps with that breakpoint disarmed; its
    debug exit re-arms everything and lets it run on without telling gdb. Single steps run
    with execute breakpoints at rip disarmed for the same reason. This is correct on every
    host, so it is done everywhere.

Memory
    m/M/X addresses are guest-virtual, translated through the page tables of the selected
    vCPU (CR3 from its sregs) and accessed through GuestMemory only. Unmapped, non-canonical,
    MMIO or out-of-RAM addresses answer E14 (EFAULT); a read that faults part way returns the
    bytes before the fault.

Layout
    This module is the session: the socket, packet framing and dispatch. Run control (debug
    exits, parking, resuming, stepping) is :mod:`vmscope.gdbstub.run_control`, registers and
    memory :mod:`vmscope.gdbstub.target_access`, the debug registers
    :mod:`vmscope.gdbstub.debugregs`; :class:`GdbStub` combines them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
from collections import deque
from typing import TYPE_CHECKING

from vmscope import sandbox
from vmscope.errors import ConfigError, GuestMemoryError, KvmError
from vmscope.gdbstub import protocol as p
from vmscope.gdbstub import registers as r
from vmscope.gdbstub.constants import (
    EFAULT_REPLY,
    EINVAL_REPLY,
    EIO_REPLY,
    ESRCH_REPLY,
    KILLED_EXIT_STATUS,
    OK,
    PARK_TIMEOUT_S,
    SIGINT,
    SIGTRAP,
)
from vmscope.gdbstub.debugregs import DebugRegisters, HwBreakpoint
from vmscope.gdbstub.run_control import RunControl, StopEvent
from vmscope.host_thread import name_host_thread
from vmscope.kvm import constants as c

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine

#: the stub's parts (constants, debug registers, run control, register and memory access) live in
#: their own modules; these names stay importable from here
__all__ = [
    "DEFAULT_ADDRESS",
    "DebugRegisters",
    "GdbStub",
    "HwBreakpoint",
    "StopEvent",
    "attach_gdb_stub",
    "is_loopback",
    "parse_gdb_spec",
]

log = logging.getLogger("vmscope.gdbstub")

DEFAULT_ADDRESS = ("127.0.0.1", 1234)

# -- address specs ---------------------------------------------------------------------------


def parse_gdb_spec(spec: str) -> tuple[str, int]:
    """``tcp:HOST:PORT`` (HOST may be empty for 127.0.0.1, or [IPv6]) -> (host, port)."""
    usage = f"--gdb {spec!r}: expected tcp:HOST:PORT, for example tcp:127.0.0.1:1234"
    if not spec.startswith("tcp:"):
        raise ConfigError(usage)
    rest = spec[len("tcp:") :]
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ConfigError(usage)
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or ":" in host:
            raise ConfigError(usage)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--gdb {spec!r}: port {port_text!r} is not a number from 0 to 65535")
    return host or "127.0.0.1", int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


# -- the server ------------------------------------------------------------------------------


class _SessionEnded(Exception):
    """The client detached, killed the VM, or went away."""


class GdbStub(RunControl):
    """Serves one gdb client at a time on a TCP socket; see the module docstring."""

    def __init__(
        self,
        machine: Machine,
        address: tuple[str, int] = DEFAULT_ADDRESS,
        *,
        allow_remote: bool = False,
        hardware_watchpoints: bool | None = None,
    ) -> None:
        host, port = address
        if not allow_remote and not is_loopback(host):
            raise ConfigError(
                f"--gdb: refusing to listen on {host}: a gdb client gets full control of the guest; "
                "use a loopback address (127.0.0.1) or allow remote clients explicitly"
            )
        if not 0 <= port <= 65535:
            raise ConfigError(f"--gdb: port {port} is not a number from 0 to 65535")
        self.machine = machine
        #: None: data watchpoints wherever they fire; PVM's instruction emulator (which runs all
        #: CPL0 code) never checks data breakpoints, so there Z2-Z4 are answered as unsupported
        self.hardware_watchpoints = (
            machine.kvm.backend != "kvm_pvm" if hardware_watchpoints is None else hardware_watchpoints
        )
        self._requested = (host, port)
        #: the address actually listened on (the port is chosen by the system for port 0)
        self.address: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._closing = False

        # shared with the vCPU threads (debug exits): guarded by _lock
        self._lock = threading.Lock()
        self._breakpoints = DebugRegisters()
        self._session_active = False
        self._held = False  # every vCPU is parked for gdb (gdb sees a stopped target)
        self._pending: StopEvent | None = None  # a stop being delivered (vCPUs parking)
        self._step_over: set[int] = set()  # vCPUs stepping off a breakpoint before they continue

        # server thread only
        self._client: socket.socket | None = None
        self._ack_mode = True
        self._last_sent = b""
        self._last_stop = StopEvent(0, SIGTRAP)
        self._general_thread = 0  # vCPU index for g/G/p/P/m/M/X
        self._continue_thread = -1  # vCPU index for c/s, -1: all / the last stopped one
        self._exit_reported = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self.address is None:
            raise ConfigError("the gdb stub is not listening yet: call start() first")
        return self.address[1]

    def hold_at_start(self) -> None:
        """Keep every vCPU before its first instruction until a gdb client continues.

        Call before machine.start(): the runners then park in their first KVM_RUN, which
        returns at once because the pause request set immediate_exit.
        """
        with self._lock:
            self._pause_all()
            self._held = True
            self._pending = None

    def start(self) -> None:
        """Listen and serve clients on a background thread."""
        if self._listener is not None:
            raise ConfigError("this gdb stub is already started")
        host, port = self._requested
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
            listener.listen(1)
        except OSError as error:
            listener.close()
            raise ConfigError(f"--gdb: cannot listen on {host}:{port}: {error.strerror or error}") from None
        self._listener = listener
        bound = listener.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        self.machine.rare_exit_handlers.add(c.ExitReason.DEBUG, self._on_debug_exit)
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._thread.start()
        log.info("gdb stub listening on %s:%d", *self.address)

    def close(self) -> None:
        """Stop serving; a connected client is detached and a held VM resumes."""
        if self._closing:
            return
        self._closing = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=PARK_TIMEOUT_S + 5)
        elif self._held:
            self._release_vm()
        if self._listener is not None:
            self._listener.close()
        self.machine.rare_exit_handlers.remove(c.ExitReason.DEBUG, self._on_debug_exit)
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        name_host_thread()
        sandbox.enter_or_log("control")  # accepts a debugger, reads and writes guest state
        listener = self._listener
        assert listener is not None
        try:
            while not self._closing:
                readable, _, _ = select.select([listener.fileno(), self._wake_read], [], [], 0.5)
                if self._wake_read in readable:
                    self._drain_wake()
                if listener.fileno() in readable and not self._closing:
                    try:
                        client, peer = listener.accept()
                    except OSError:
                        continue
                    self._run_session(client, peer)
        except Exception:  # the stub must never take the VM down with it
            log.exception("gdb stub failed")
        finally:
            if self._held and not self._vm_finished():
                self._release_vm()

    def _run_session(self, client: socket.socket, peer: object) -> None:
        log.info("gdb client connected from %s", peer)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client = client
        self._ack_mode = True
        self._exit_reported = False
        parser = p.PacketParser()
        inbox: deque[bytes] = deque()
        killed = False
        try:
            self._begin_session()
            listener = self._listener
            assert listener is not None
            while not self._closing:
                self._deliver_stop_or_exit()
                while inbox and (self._held or self._exit_reported):
                    self._handle_packet(inbox.popleft())
                readable, _, _ = select.select(
                    [client.fileno(), self._wake_read, listener.fileno()], [], [], 0.1
                )
                if self._wake_read in readable:
                    self._drain_wake()
                if listener.fileno() in readable:
                    with contextlib.suppress(OSError):
                        extra, _ = listener.accept()
                        extra.close()  # one client at a time
                if client.fileno() in readable:
                    data = client.recv(65536)
                    if not data:
                        raise _SessionEnded("client closed the connection")
                    for event in parser.feed(data):
                        self._on_parser_event(event, inbox)
        except _SessionEnded as reason:
            killed = str(reason) == "kill"
            log.info("gdb session ended: %s", reason)
        except OSError as error:
            log.info("gdb connection lost: %s", error)
        finally:
            self._client = None
            with contextlib.suppress(OSError):
                client.close()
            with self._lock:
                self._session_active = False
            if not killed and not self._vm_finished():
                self._release_vm()

    def _begin_session(self) -> None:
        """gdb expects a stopped target when it connects: stop a running VM first."""
        with self._lock:
            self._session_active = True
            self._breakpoints.clear()
            already_held = self._held
            if not already_held:
                self._pause_all()
        if not already_held:
            self._wait_parked()
            with self._lock:
                self._held = True
                self._pending = None
                self._step_over.clear()
        self._last_stop = StopEvent(0, SIGTRAP)
        self._general_thread = 0
        self._continue_thread = -1

    def _deliver_stop_or_exit(self) -> None:
        if self._exit_reported:
            return
        if self._vm_finished():
            if not self._held:  # gdb is waiting for the target: tell it the VM is gone
                self._send(self._exit_packet())
                self._exit_reported = True
            return
        with self._lock:
            pending = self._pending if not self._held else None
        if pending is None:
            return
        self._wait_parked()
        if self._vm_finished():
            return  # reported as an exit on the next round
        with self._lock:
            self._held = True
            self._pending = None
            self._step_over.clear()
        self._last_stop = pending
        self._general_thread = pending.vcpu_index
        self._send(pending.reply())

    def _on_parser_event(self, event: p.ParserEvent, inbox: deque[bytes]) -> None:
        kind = event.kind
        if kind is p.EventKind.PACKET:
            if self._ack_mode:
                self._send_raw(b"+")
            inbox.append(event.payload)
        elif kind is p.EventKind.BAD_PACKET:
            if self._ack_mode:
                self._send_raw(b"-")
        elif kind is p.EventKind.NACK:
            if self._ack_mode and self._last_sent:
                self._send_raw(self._last_sent)
        elif kind is p.EventKind.INTERRUPT:
            self._interrupt()

    def _interrupt(self) -> None:
        """Ctrl-C: stop every vCPU and report SIGINT (ignored while already stopped)."""
        with self._lock:
            if self._held or self._pending is not None:
                return
            thread = self._continue_thread if self._continue_thread >= 0 else self._last_stop.vcpu_index
            self._pending = StopEvent(thread, SIGINT)
            self._pause_all()

    def _send_raw(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        client.sendall(data)

    def _send(self, payload: bytes) -> None:
        packet = p.frame_packet(payload)
        self._last_sent = packet
        self._send_raw(packet)

    # -- packets -----------------------------------------------------------------------------

    def _handle_packet(self, payload: bytes) -> None:
        try:
            reply = self._dispatch(payload)
        except _SessionEnded:
            raise
        except p.ProtocolError as error:
            log.debug("bad packet %r: %s", payload[:60], error)
            reply = EINVAL_REPLY
        except GuestMemoryError:
            reply = EFAULT_REPLY
        except KvmError as error:
            log.debug("packet %r failed: %s", payload[:60], error)
            reply = EIO_REPLY
        if reply is not None:
            self._send(reply)

    def _dispatch(self, payload: bytes) -> bytes | None:
        """The reply to one packet; None when the reply comes later (resume) or never (kill)."""
        head = payload[:1]
        body = payload[1:]
        if head == b"?":
            return self._exit_packet() if self._vm_finished() else self._last_stop.reply()
        if head == b"g":
            return r.encode_registers(self._read_registers())
        if head == b"G":
            return self._write_registers(r.decode_registers(body))
        if head == b"p":
            number = p.parse_hex_int(body)
            if number >= len(r.REGISTERS):
                return EINVAL_REPLY
            return r.encode_register(number, self._read_registers()[r.REGISTERS[number].name])
        if head == b"P":
            number_text, sep, value_text = body.partition(b"=")
            number = p.parse_hex_int(number_text)
            if not sep or number >= len(r.REGISTERS):
                return EINVAL_REPLY
            return self._write_registers({r.REGISTERS[number].name: r.decode_register(number, value_text)})
        if head == b"m":
            address, length = p.parse_address_length(body)
            return p.encode_hex(self._read_memory(address, length))
        if head in (b"M", b"X"):
            location, sep, data = body.partition(b":")
            if not sep:
                return EINVAL_REPLY
            address, length = p.parse_address_length(location)
            data = p.decode_hex(data) if head == b"M" else p.unescape_binary(data)
            if len(data) != length:
                return EINVAL_REPLY
            self._write_memory(address, data)
            return OK
        if head in (b"c", b"C", b"s", b"S"):
            return self._legacy_resume(head, body)
        if head == b"H":
            return self._set_thread(body)
        if head == b"T":
            return OK if self._valid_thread(p.parse_thread_id(body)) else ESRCH_REPLY
        if head in (b"Z", b"z"):
            return self._breakpoint_packet(head == b"Z", body)
        if head == b"D":
            self._send(OK)
            raise _SessionEnded("detached")
        if head == b"k":
            self._kill()
        if head == b"v":
            return self._v_packet(payload)
        if head in (b"q", b"Q"):
            return self._query(payload)
        return b""  # unsupported: the empty reply

    def _query(self, payload: bytes) -> bytes | None:
        name, _, args = payload.partition(b":")
        if name == b"qSupported":
            return (
                f"PacketSize={p.MAX_PACKET_SIZE:x};qXfer:features:read+;swbreak-;hwbreak+;"
                "QStartNoAckMode+;vContSupported+"
            ).encode("ascii")
        if name == b"QStartNoAckMode":
            self._send(OK)  # still acknowledged: the client switches after reading this reply
            self._ack_mode = False
            return None
        if name == b"qAttached":
            return b"1"  # an existing VM: gdb detaches from it on quit instead of killing it
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (index + 1) for index in range(len(self.machine.runners)))
        if name == b"qsThreadInfo":
            return b"l"
        if name == b"qC":
            return b"QC%x" % (self._last_stop.vcpu_index + 1)
        if name.startswith(b"qThreadExtraInfo,"):
            thread = p.parse_thread_id(name.split(b",", 1)[1])
            if not self._valid_thread(thread) or thread <= 0:
                return ESRCH_REPLY
            return p.encode_hex(f"vCPU {thread - 1}".encode())
        if name == b"qXfer":
            parts = args.split(b":")
            if len(parts) != 4 or parts[:2] != [b"features", b"read"]:
                return b""
            if parts[2] != b"target.xml":
                return b"E00"
            offset, length = p.parse_address_length(parts[3])
            return p.qxfer_reply(r.target_xml().encode("ascii"), offset, min(length, p.MAX_PACKET_SIZE - 16))
        if name == b"qSymbol":
            return OK
        return b""

    def _v_packet(self, payload: bytes) -> bytes | None:
        if payload == b"vCont?":
            return b"vCont;c;C;s;S"
        if payload.startswith(b"vCont;"):
            return self._vcont(payload[len(b"vCont;") :])
        if payload.startswith(b"vKill"):
            self._send(OK)
            self._kill()
        return b""  # vMustReplyEmpty and everything else

    def _kill(self) -> None:
        log.info("gdb client killed the VM")
        with self._lock:
            self._breakpoints.clear()
        self.machine.request_stop("killed by the gdb client", KILLED_EXIT_STATUS)
        raise _SessionEnded("kill")


def attach_gdb_stub(
    machine: Machine, spec: str, *, wait_for_client: bool, allow_remote: bool = False
) -> GdbStub:
    """Start a stub on ``spec`` (``tcp:HOST:PORT``) for ``machine``; call before machine.start().

    With ``wait_for_client`` the VM stays before its first instruction until a gdb client
    attaches and continues (QEMU's ``-S -gdb``). Close the stub when the run is over.
    """
    stub = GdbStub(machine, parse_gdb_spec(spec), allow_remote=allow_remote)
    if wait_for_client:
        stub.hold_at_start()
    try:
        stub.start()
    except Exception:
        if wait_for_client:
            stub.close()
        raise
    return stub
