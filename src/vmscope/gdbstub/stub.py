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
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmscope import sandbox
from vmscope.errors import ConfigError, GuestMemoryError, KvmError
from vmscope.gdbstub import protocol as p
from vmscope.gdbstub import registers as r
from vmscope.host_thread import name_host_thread
from vmscope.kvm import constants as c
from vmscope.memory.paging import CR4_LA57, PagingMode, read_virtual, translate

if TYPE_CHECKING:
    from vmscope.vmm.machine import Machine
    from vmscope.vmm.runner import VcpuRunner

log = logging.getLogger("vmscope.gdbstub")

DEFAULT_ADDRESS = ("127.0.0.1", 1234)

# gdb's signal numbers (GDB_SIGNAL_*), which the stop replies carry
SIGINT, SIGTRAP, SIGKILL, SIGSEGV = 2, 5, 9, 11
#: exit status of a VM ended by gdb's kill, following the machine's 128 + signal convention
KILLED_EXIT_STATUS = 128 + SIGKILL

HW_SLOTS = 4
DR6_SINGLE_STEP = 1 << 14
DR7_RESERVED_ONE = 1 << 10
#: the most bytes one m/M/X transfers (a hex reply doubles them; PacketSize bounds it)
MAX_MEMORY_TRANSFER = (p.MAX_PACKET_SIZE - 32) // 2

EFAULT_REPLY = b"E%02x" % errno.EFAULT
EINVAL_REPLY = b"E%02x" % errno.EINVAL
ENOSPC_REPLY = b"E%02x" % errno.ENOSPC
ESRCH_REPLY = b"E%02x" % errno.ESRCH
EIO_REPLY = b"E%02x" % errno.EIO
OK = b"OK"

#: how long a stop waits for every vCPU to leave KVM_RUN before it goes on regardless
PARK_TIMEOUT_S = 10.0


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


# -- debug registers -------------------------------------------------------------------------

_DR7_RW = {"exec": 0b00, "write": 0b01, "read": 0b11, "access": 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
_WATCH_PREFIX = {"write": "watch", "read": "rwatch", "access": "awatch"}
#: Z/z packet type -> breakpoint kind
Z_TYPES = {0: "exec", 1: "exec", 2: "write", 3: "read", 4: "access"}


@dataclass
class HwBreakpoint:
    kind: str  # "exec", "write", "read" (x86 can only watch reads with writes) or "access"
    address: int
    length: int
    references: int = 1


class DebugRegisters:
    """Breakpoints and watchpoints assigned to DR0-DR3, and the DR7 that enables them."""

    def __init__(self) -> None:
        self.slots: list[HwBreakpoint | None] = [None] * HW_SLOTS

    def _find(self, kind: str, address: int, length: int) -> int | None:
        for index, slot in enumerate(self.slots):
            if slot is not None and (slot.kind, slot.address, slot.length) == (kind, address, length):
                return index
        return None

    def insert(self, kind: str, address: int, length: int) -> bool:
        """Add a breakpoint (length 1) or watchpoint; False when all four slots are taken."""
        if kind not in _DR7_RW:
            raise p.ProtocolError(f"unknown breakpoint kind {kind!r}")
        if kind == "exec":
            length = 1
        elif length not in _DR7_LEN or address % length:
            raise p.ProtocolError(
                f"watchpoints cover 1, 2, 4 or 8 aligned bytes, not {length} at {address:#x}"
            )
        found = self._find(kind, address, length)
        if found is not None:
            slot = self.slots[found]
            assert slot is not None
            slot.references += 1
            return True
        for index, slot in enumerate(self.slots):
            if slot is None:
                self.slots[index] = HwBreakpoint(kind, address, length)
                return True
        return False

    def remove(self, kind: str, address: int, length: int) -> bool:
        found = self._find(kind, address, 1 if kind == "exec" else length)
        if found is None:
            return False
        slot = self.slots[found]
        assert slot is not None
        slot.references -= 1
        if slot.references <= 0:
            self.slots[found] = None
        return True

    def clear(self) -> None:
        self.slots = [None] * HW_SLOTS

    @property
    def active(self) -> bool:
        return any(slot is not None for slot in self.slots)

    def exec_at(self, address: int) -> bool:
        return any(slot.kind == "exec" and slot.address == address for slot in self.slots if slot is not None)

    def debugregs(self, *, disarm_exec_at: int | None = None) -> list[int]:
        """kvm_guest_debug.debugreg: DR0-DR3, two unused, DR6 (0) and DR7."""
        values = [0] * 8
        dr7 = DR7_RESERVED_ONE
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            values[index] = slot.address
            if slot.kind == "exec" and slot.address == disarm_exec_at:
                continue
            dr7 |= 1 << (2 * index + 1)  # G<n>: enabled in every task
            dr7 |= (_DR7_RW[slot.kind] | (_DR7_LEN[slot.length] << 2)) << (16 + 4 * index)
        values[7] = dr7
        return values

    def hits(self, dr6: int) -> list[HwBreakpoint]:
        """The breakpoints whose B<n> bit is set in ``dr6``."""
        return [slot for index, slot in enumerate(self.slots) if slot is not None and dr6 & (1 << index)]


# -- the server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopEvent:
    vcpu_index: int
    signal: int
    extra: str = ""  # "hwbreak:;" or "watch:ADDR;" and the like

    def reply(self) -> bytes:
        return p.stop_reply(self.signal, self.vcpu_index + 1, self.extra)


class _SessionEnded(Exception):
    """The client detached, killed the VM, or went away."""


class GdbStub:
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
        self._previous_handler = machine.debug_exit_handler

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
        self.machine.debug_exit_handler = self._on_debug_exit
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
        if self.machine.debug_exit_handler == self._on_debug_exit:
            self.machine.debug_exit_handler = self._previous_handler
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- vCPU side ---------------------------------------------------------------------------

    def _on_debug_exit(self, runner: VcpuRunner) -> bool:
        """KVM_EXIT_DEBUG, on the vCPU's own thread: record the stop and park every vCPU."""
        vcpu = runner.vcpu
        debug = vcpu.run_struct.exit.debug
        dr6, pc = int(debug.dr6), int(debug.pc)
        index = vcpu.id
        with self._lock:
            if index in self._step_over:
                self._step_over.discard(index)
                watched = [hit for hit in self._breakpoints.hits(dr6) if hit.kind != "exec"]
                if not watched or not self._session_active:
                    # stepped off a breakpoint: re-arm and run on, gdb never hears of it
                    self._arm(runner, disarm_exec_at=None, single_step=False)
                    return True
                event = self._classify(index, pc, dr6)
            elif not self._session_active:
                # left over from a client that detached while this vCPU was running
                self._set_guest_debug(runner, 0, ())
                return True
            else:
                event = self._classify(index, pc, dr6)
            if self._pending is None and not self._held:
                self._pending = event
                self._pause_all()
                self._wake()
            # Otherwise a stop is already being reported: this vCPU parks with the others
            # and its event is dropped; a breakpoint fires again when the vCPU resumes.
        return True

    def _classify(self, index: int, pc: int, dr6: int) -> StopEvent:
        hits = self._breakpoints.hits(dr6)
        for hit in hits:
            if hit.kind != "exec":
                return StopEvent(index, SIGTRAP, f"{_WATCH_PREFIX[hit.kind]}:{hit.address:x};")
        if hits or (not dr6 & DR6_SINGLE_STEP and self._breakpoints.exec_at(pc)):
            return StopEvent(index, SIGTRAP, "hwbreak:;")
        return StopEvent(index, SIGTRAP)

    # -- vCPU control (callers hold _lock unless noted) ----------------------------------------

    def _pause_all(self) -> None:
        for runner in self.machine.runners:
            runner.request_pause()

    def _wait_parked(self) -> None:
        """Wait (without _lock: a vCPU may need it to get there) until no vCPU is in KVM_RUN."""
        deadline = time.monotonic() + PARK_TIMEOUT_S
        for runner in self.machine.runners:
            while not (runner.paused.is_set() or runner.exited.is_set() or runner.thread is None):
                if time.monotonic() > deadline:
                    log.warning("vCPU %d did not pause within %g s", runner.vcpu.id, PARK_TIMEOUT_S)
                    return
                runner.paused.wait(0.005)

    def _vm_finished(self) -> bool:
        return all(runner.exited.is_set() for runner in self.machine.runners)

    def _set_guest_debug(self, runner: VcpuRunner, control: int, debugregs: Sequence[int]) -> None:
        try:
            runner.vcpu.set_guest_debug(control, debugregs)
        except KvmError as error:  # the machine may be closing under us
            log.debug("KVM_SET_GUEST_DEBUG on vCPU %d failed: %s", runner.vcpu.id, error)

    def _arm(self, runner: VcpuRunner, *, disarm_exec_at: int | None, single_step: bool) -> None:
        control = 0
        debugregs: list[int] = []
        if self._breakpoints.active:
            control = c.GUESTDBG_ENABLE | c.GUESTDBG_USE_HW_BP
            debugregs = self._breakpoints.debugregs(disarm_exec_at=disarm_exec_at)
        if single_step:
            control |= c.GUESTDBG_ENABLE | c.GUESTDBG_SINGLESTEP
        self._set_guest_debug(runner, control, debugregs)

    def _linear_rip(self, runner: VcpuRunner) -> int:
        regs = runner.vcpu.get_regs()
        sregs = runner.vcpu.get_sregs()
        if sregs.efer & (1 << 10) and sregs.cs.l:  # 64-bit code: segment bases are ignored
            return int(regs.rip)
        return (int(sregs.cs.base) + int(regs.rip)) & 0xFFFF_FFFF

    def _resume(self, actions: dict[int, str]) -> None:
        """Run the vCPUs in ``actions`` ("c" or "s"); the others stay parked."""
        with self._lock:
            self._step_over.clear()
            for index, action in actions.items():
                runner = self.machine.runners[index]
                rip = self._linear_rip(runner)
                if action == "s":
                    self._arm(runner, disarm_exec_at=rip, single_step=True)
                elif self._breakpoints.exec_at(rip):
                    self._step_over.add(index)
                    self._arm(runner, disarm_exec_at=rip, single_step=True)
                else:
                    self._arm(runner, disarm_exec_at=None, single_step=False)
            self._held = False
            self._pending = None
            for index in actions:
                self.machine.runners[index].resume()

    def _release_vm(self) -> None:
        """Detach: no breakpoints, no single-step, every vCPU running (unless the VM ended)."""
        with self._lock:
            self._pause_all()
        self._wait_parked()
        with self._lock:
            self._breakpoints.clear()
            self._step_over.clear()
            for runner in self.machine.runners:
                if not runner.exited.is_set():
                    self._set_guest_debug(runner, 0, ())
            self._held = False
            self._pending = None
            self.machine.resume()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the server
            os.write(self._wake_write, b"!")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_read, 4096):
                pass

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

    def _exit_packet(self) -> bytes:
        result = self.machine.result()
        if result.crash is not None:
            return p.killed_reply(SIGSEGV)
        return p.exit_reply(result.exit_status)

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

    # -- threads and resuming ----------------------------------------------------------------

    def _valid_thread(self, thread: int) -> bool:
        return thread in (-1, 0) or 1 <= thread <= len(self.machine.runners)

    def _set_thread(self, body: bytes) -> bytes:
        operation, thread = body[:1], p.parse_thread_id(body[1:])
        if not self._valid_thread(thread):
            return ESRCH_REPLY
        if operation == b"g":
            if thread > 0:
                self._general_thread = thread - 1
        elif operation == b"c":
            self._continue_thread = thread - 1 if thread > 0 else -1
        else:
            return EINVAL_REPLY
        return OK

    def _ensure_resumable(self) -> bytes | None:
        if self._vm_finished():
            self._exit_reported = True
            return self._exit_packet()
        return None

    def _legacy_resume(self, head: bytes, body: bytes) -> bytes | None:
        """c/s [ADDR] and C/S SIG[;ADDR]: the signal is ignored (a VM has no signals)."""
        finished = self._ensure_resumable()
        if finished is not None:
            return finished
        address_text = body.partition(b";")[2] if head in (b"C", b"S") else body
        thread = self._continue_thread if self._continue_thread >= 0 else self._last_stop.vcpu_index
        if address_text:
            self._write_registers({"rip": p.parse_hex_int(address_text)}, vcpu_index=thread)
        if head in (b"s", b"S"):
            self._resume({thread: "s"})
        else:
            self._resume({index: "c" for index in range(len(self.machine.runners))})
        return None

    def _vcont(self, spec: bytes) -> bytes | None:
        count = len(self.machine.runners)
        actions: dict[int, str] = {}
        for item in spec.split(b";"):
            action, sep, thread_text = item.partition(b":")
            if action[:1] not in (b"c", b"C", b"s", b"S"):
                return EINVAL_REPLY
            kind = "s" if action[:1] in (b"s", b"S") else "c"
            thread = p.parse_thread_id(thread_text) if sep else -1
            if thread == 0 or not self._valid_thread(thread):
                return ESRCH_REPLY
            targets = range(count) if thread == -1 else (thread - 1,)
            for index in targets:
                actions.setdefault(index, kind)  # the leftmost action naming a thread wins
        if not actions:
            return EINVAL_REPLY
        finished = self._ensure_resumable()
        if finished is not None:
            return finished
        self._resume(actions)
        return None

    def _breakpoint_packet(self, insert: bool, body: bytes) -> bytes:
        fields = body.split(b";", 1)[0].split(b",")
        if len(fields) != 3:
            return EINVAL_REPLY
        z_type = p.parse_hex_int(fields[0], limit=0xFF)
        kind = Z_TYPES.get(z_type)
        if kind is None or (kind != "exec" and not self.hardware_watchpoints):
            return b""
        address = p.parse_hex_int(fields[1])
        length = p.parse_hex_int(fields[2], limit=0xFFFF)
        with self._lock:
            if not insert:
                self._breakpoints.remove(kind, address, length)
                return OK
            return OK if self._breakpoints.insert(kind, address, length) else ENOSPC_REPLY

    # -- registers and memory (only while every vCPU is parked) --------------------------------

    def _vcpu(self, vcpu_index: int | None) -> VcpuRunner:
        index = self._general_thread if vcpu_index is None else vcpu_index
        return self.machine.runners[index]

    def _read_registers(self, vcpu_index: int | None = None) -> r.RegisterValues:
        vcpu = self._vcpu(vcpu_index).vcpu
        return r.registers_from_kvm(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu())

    def _write_registers(self, values: r.RegisterValues, vcpu_index: int | None = None) -> bytes:
        vcpu = self._vcpu(vcpu_index).vcpu
        regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
        try:
            changed = r.apply_registers(values, regs, sregs, fpu)
        except r.RegisterWriteError as error:
            log.info("%s", error)
            return EINVAL_REPLY
        if changed.regs:
            vcpu.set_regs(regs)
        if changed.sregs:
            vcpu.set_sregs(sregs)
        if changed.fpu:
            vcpu.set_fpu(fpu)
        return OK

    def _paging_mode(self) -> PagingMode:
        sregs = self._vcpu(None).vcpu.get_sregs()
        return PagingMode(int(sregs.cr0), int(sregs.cr3), int(sregs.cr4), int(sregs.efer))

    def _chunks(self, address: int, length: int) -> list[tuple[int, int]]:
        """(guest-virtual address, length) pieces that do not cross a 4 KiB page."""
        pieces = []
        end = address + length
        while address < end:
            size = min(end - address, 0x1000 - (address & 0xFFF))
            pieces.append((address, size))
            address += size
        return pieces

    def _check_address(self, mode: PagingMode, address: int, length: int) -> None:
        if address + length > 1 << 64:
            raise GuestMemoryError(f"{address:#x}+{length:#x} wraps past the end of the address space")
        if mode.enabled and mode.long_mode:
            bits = 57 if mode.cr4 & CR4_LA57 else 48
            for probe in (address, address + length - 1):
                upper = probe >> (bits - 1)
                if upper not in (0, (1 << (65 - bits)) - 1):
                    raise GuestMemoryError(f"{probe:#x} is not a canonical address")
        elif not mode.long_mode and address + length > 1 << 32:
            raise GuestMemoryError(f"{address:#x}+{length:#x} lies beyond the 32-bit address space")

    def _read_memory(self, address: int, length: int) -> bytes:
        length = min(length, MAX_MEMORY_TRANSFER)
        if length == 0:
            return b""
        mode = self._paging_mode()
        out = bytearray()
        for piece, size in self._chunks(address, min(length, (1 << 64) - address)):
            try:
                self._check_address(mode, piece, size)
                out += read_virtual(self.machine.memory, mode, piece, size)
            except GuestMemoryError:
                break
        if not out:
            raise GuestMemoryError(f"cannot read guest-virtual {address:#x}")
        return bytes(out)

    def _write_memory(self, address: int, data: bytes) -> None:
        """All or nothing: every page is translated and checked before the first byte is written."""
        if not data:
            return
        if len(data) > MAX_MEMORY_TRANSFER:
            raise p.ProtocolError(f"memory write of {len(data)} bytes exceeds {MAX_MEMORY_TRANSFER}")
        mode = self._paging_mode()
        self._check_address(mode, address, len(data))
        memory = self.machine.memory
        targets = []
        for piece, size in self._chunks(address, len(data)):
            physical = translate(memory, mode, piece)
            if not memory.contains(physical, size):
                raise GuestMemoryError(f"guest-virtual {piece:#x} maps to {physical:#x}, outside guest RAM")
            targets.append((physical, piece - address, size))
        for physical, offset, size in targets:
            memory.write(physical, data[offset : offset + size])


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
