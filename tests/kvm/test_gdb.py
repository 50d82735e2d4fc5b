"""The GDB stub on real KVM: the real gdb against a C guest, and the protocol packet by packet."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from vmscope.errors import ConfigError
from vmscope.gdbstub import GdbStub, attach_gdb_stub
from vmscope.gdbstub.registers import REGISTER_NUMBERS, REGISTERS
from vmscope.kvm.constants import ExitReason
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

LINKER_SCRIPT = """\
ENTRY(_start)
SECTIONS
{
    . = 0x100000;
    .text : { *(.text .text.*) }
    .rodata : { *(.rodata .rodata.*) }
    .data : { *(.data .data.*) }
    .bss : { *(.bss .bss.*) *(COMMON) }
    /DISCARD/ : { *(.note.*) *(.eh_frame*) *(.comment) }
}
"""

OUTB = """\
static inline void outb(unsigned short port, unsigned char value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}
"""

# One call of compute(): at its breakpoint counter is 15; the guest exits with 15 + 14 = 29,
# which the debug-exit port turns into status (29 << 1) | 1 = 59.
ONE_CALL_GUEST = (
    "volatile int counter = 5;\n"
    + OUTB
    + """
int compute(int n)
{
    counter = counter + n * 2;  /* compute's first line */
    return counter;
}

void _start(void)
{
    counter = counter * 3;
    int result = compute(7);
    outb(0xf4, (unsigned char)result);
    for (;;)
        __asm__ volatile("hlt");
}
"""
)

# Three calls of compute() (counter 0 -> 1 -> 3 -> 6), then a spin until something writes
# `release`; exit value (counter + release) & 0xff.
SPIN_GUEST = (
    "volatile int counter = 0;\nvolatile int release = 0;\n"
    + OUTB
    + """
int compute(int n)
{
    counter = counter + n;
    return counter;
}

void _start(void)
{
    for (int i = 1; i <= 3; i++)
        compute(i);
    while (!release) {
    }
    outb(0xf4, (unsigned char)(counter + release));
    for (;;)
        __asm__ volatile("hlt");
}
"""
)


def _build(directory: Path, name: str, source: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the GDB test guests are built from C")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.c").write_text(source)
    (directory / "guest.ld").write_text(LINKER_SCRIPT)
    output = directory / f"{name}.elf"
    subprocess.run(
        [
            gcc, "-O0", "-g", "-fno-pic", "-no-pie", "-nostdlib", "-ffreestanding", "-mno-red-zone",
            "-static", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-T", str(directory / "guest.ld"),
            "-o", str(output), str(directory / f"{name}.c"),
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return output


def _symbols(elf: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) from the ELF symbol table."""
    with open(elf, "rb") as stream:
        table = ELFFile(stream).get_section_by_name(".symtab")
        return {sym.name: (sym["st_value"], sym["st_size"]) for sym in table.iter_symbols() if sym.name}


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("gdb-guests")
    return {
        "one_call": _build(directory, "one_call", ONE_CALL_GUEST),
        "spin": _build(directory, "spin", SPIN_GUEST),
    }


class RawClient:
    """A minimal gdb-side protocol client with its own framing (independent of the stub's code)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.acks = True

    def send(self, payload: bytes) -> None:
        self.sock.sendall(b"$" + payload + b"#" + b"%02x" % (sum(payload) % 256))

    def receive(self) -> bytes:
        while True:
            match = re.search(rb"\$([^#]*)#([0-9a-f]{2})", self.buffer, re.S)
            if match:
                payload = match.group(1)
                assert int(match.group(2), 16) == sum(payload) % 256, "bad checksum from the stub"
                assert b"*" not in payload, "the stub must not send run-length encoding"
                self.buffer = self.buffer[match.end() :]
                if self.acks:
                    self.sock.sendall(b"+")
                return payload
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.buffer += data.lstrip(b"+") if not self.buffer else data

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.receive()

    def read_register(self, name: str) -> int:
        return int.from_bytes(bytes.fromhex(self.request(b"p%x" % REGISTER_NUMBERS[name]).decode()), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(bytes.fromhex(self.request(b"m%x,4" % address).decode()), "little")

    def close(self) -> None:
        self.sock.close()


def _run_gdb(gdb: str, port: int, commands: list[str], elf: Path) -> subprocess.CompletedProcess[str]:
    argv = [gdb, "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}"]
    for command in commands:
        argv += ["-ex", command]
    return subprocess.run([*argv, str(elf)], capture_output=True, text=True, timeout=60)


def _machine(elf: Path, cpus: int = 1) -> Machine:
    machine = Machine(mem="32M", cpus=cpus)
    install_platform_devices(machine, serial="none")
    machine.load(elf)
    return machine


def test_real_gdb_breaks_in_compute_prints_counter_steps_and_sees_the_exit(guests: dict[str, Path]) -> None:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    elf = guests["one_call"]
    first_line = "    counter = counter + n * 2;  /* compute's first line */"
    source_line = ONE_CALL_GUEST.splitlines().index(first_line)
    with _machine(elf) as machine:
        stub = attach_gdb_stub(machine, "tcp:127.0.0.1:0", wait_for_client=True)
        try:
            machine.start()
            assert machine.runners[0].paused.wait(5), "wait_for_client must hold the vCPU before it runs"
            commands = ["break compute", "continue", "print counter",
                        "info registers rip", "stepi", "info registers rip", "continue"]  # fmt: skip
            gdb_run = _run_gdb(gdb, stub.port, commands, elf)
            result = machine.wait(timeout=10)
        finally:
            stub.close()
    out = gdb_run.stdout
    assert re.search(rf"Breakpoint 1, compute \(n=7\) at .*one_call\.c:{source_line + 1}\n", out), out
    assert f"{source_line + 1}\t    counter = counter + n * 2;" in out
    assert "$1 = 15\n" in out
    rips = [int(value, 16) for value in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert len(rips) == 2, out
    compute_address, compute_size = _symbols(elf)["compute"]
    assert compute_address < rips[0] < rips[1] < compute_address + compute_size  # stepi moved one instruction
    assert re.search(r"^rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <compute\+\d+>", out, re.M)
    assert "exited with code 073" in out, out + gdb_run.stderr  # 59 in octal, as gdb prints it
    assert result is not None and result.exit_status == 59 and result.crash is None


def test_real_gdb_watchpoint_reports_the_change(guests: dict[str, Path]) -> None:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    elf = guests["one_call"]
    with _machine(elf) as machine:
        stub = attach_gdb_stub(machine, "tcp:127.0.0.1:0", wait_for_client=True)
        try:
            machine.start()
            commands = ["break compute", "continue", "delete"]
            if not stub.hardware_watchpoints:  # PVM: gdb watches by single-stepping the guest
                commands.append("set can-use-hw-watchpoints 0")
            commands += ["watch counter", "continue", "delete", "continue"]
            gdb_run = _run_gdb(gdb, stub.port, commands, elf)
            result = machine.wait(timeout=10)
        finally:
            stub.close()
    out = gdb_run.stdout
    assert re.search(r"(Hardware w|W)atchpoint 2: counter\n\nOld value = 15\nNew value = 29\n", out), out
    assert "exited with code 073" in out, out + gdb_run.stderr
    assert result is not None and result.exit_status == 59


def test_protocol_breakpoints_watchpoints_steps_interrupt_memory_registers(guests: dict[str, Path]) -> None:
    elf = guests["spin"]
    symbols = _symbols(elf)
    compute, counter, release = symbols["compute"][0], symbols["counter"][0], symbols["release"][0]
    start, start_size = symbols["_start"]
    with _machine(elf, cpus=2) as machine:
        stub = attach_gdb_stub(machine, "tcp:127.0.0.1:0", wait_for_client=True)
        try:
            machine.start()
            client = RawClient(stub.port)
            supported = client.request(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
            assert b"PacketSize=" in supported and b"qXfer:features:read+" in supported
            assert b"hwbreak+" in supported and b"swbreak-" in supported
            assert client.request(b"?") == b"T05thread:01;"
            assert client.request(b"qfThreadInfo") == b"m1,2" and client.request(b"qsThreadInfo") == b"l"
            assert client.request(b"qAttached") == b"1"
            assert client.request(b"vCont?") == b"vCont;c;C;s;S"
            assert client.request(b"qUnknownThing") == b"" and client.request(b"!") == b""

            document = b""
            while True:
                chunk = client.request(b"qXfer:features:read:target.xml:%x,100" % len(document))
                document += chunk[1:]
                if chunk[:1] == b"l":
                    break
                assert chunk[:1] == b"m"
            names = [reg.get("name") for reg in ET.fromstring(document).iter("reg")]
            assert names == [info.name for info in REGISTERS]
            assert client.request(b"qXfer:features:read:other.xml:0,100").startswith(b"E")

            registers = bytes.fromhex(client.request(b"g").decode())
            assert len(registers) == sum(info.size for info in REGISTERS)
            rip_offset = 16 * 8  # rip follows the 16 general registers
            assert int.from_bytes(registers[rip_offset : rip_offset + 8], "little") == start
            assert client.request(b"G" + registers.hex().encode()) == b"OK"

            assert client.request(b"QStartNoAckMode") == b"OK"
            client.acks = False

            # A breakpoint the vCPU sits on is stepped over when it continues: without that it
            # would fire again at once on a host that ignores RF.
            assert client.request(b"Z1,%x,1" % compute) == b"OK"
            for expected_counter in (0, 1, 3):
                assert client.request(b"c") == b"T05thread:01;hwbreak:;"
                assert client.read_register("rip") == compute
                assert client.read_u32(counter) == expected_counter
            assert client.request(b"z1,%x,1" % compute) == b"OK"

            if stub.hardware_watchpoints:
                # a write watchpoint stops after compute(3) stores 6
                assert client.request(b"Z2,%x,4" % counter) == b"OK"
                assert client.request(b"c") == b"T05thread:01;watch:%x;" % counter
                assert client.read_u32(counter) == 6
                assert compute < client.read_register("rip") < start
                assert client.request(b"z2,%x,4" % counter) == b"OK"
                assert client.request(b"Z2,%x,3" % counter).startswith(b"E")  # no 3-byte debug register
            else:
                # PVM never checks data breakpoints: gdb is told so and watches in software
                assert machine.kvm.backend == "kvm_pvm"
                assert client.request(b"Z2,%x,4" % counter) == b""
                # finish compute(3) by single steps until it stores 6
                for _ in range(200):
                    if client.read_u32(counter) == 6:
                        break
                    assert client.request(b"vCont;s:1") == b"T05thread:01;"
                assert client.read_u32(counter) == 6

            rip = client.read_register("rip")
            assert client.request(b"vCont;s:1") == b"T05thread:01;"
            assert client.read_register("rip") != rip

            # Ctrl-C while the guest spins waiting for `release`
            client.send(b"vCont;c")
            time.sleep(0.3)
            client.sock.sendall(b"\x03")
            assert client.receive() == b"T02thread:01;"
            assert start <= client.read_register("rip") < start + start_size
            assert all(runner.paused.is_set() for runner in machine.runners)

            # unmapped, non-canonical, MMIO and wrapping addresses answer E14, never crash
            for address in (0x2_0000_0000, 0x8000_0000_0000, 0xC000_0000, 0xFFFF_FFFF_FFFF_FF00):
                assert client.request(b"m%x,10" % address) == b"E0e"
            assert client.request(b"M%x,2:9090" % 0x2_0000_0000) == b"E0e"
            assert client.request(b"X%x,1:\x01" % 0x8000_0000_0000) == b"E0e"
            # a read running off the end of RAM returns what lies before the fault
            partial = client.request(b"m%x,20" % (32 * 1024 * 1024 - 16))
            assert len(partial) == 32

            number = REGISTER_NUMBERS["r12"]
            assert client.request(b"P%x=8877665544332211" % number) == b"OK"
            assert client.request(b"p%x" % number) == b"8877665544332211"
            assert client.request(b"P%x=1000" % REGISTER_NUMBERS["cs"]) == b"E16"  # selectors are read-only
            assert client.request(b"p%x" % len(REGISTERS)).startswith(b"E")

            # the second vCPU is a thread of its own, parked in its wait-for-SIPI state
            assert client.request(b"T2") == b"OK" and client.request(b"T3").startswith(b"E")
            assert client.request(b"Hg2") == b"OK"
            assert (client.read_register("cs"), client.read_register("rip")) == (0xF000, 0xFFF0)
            assert client.request(b"Hg1") == b"OK"
            assert client.read_register("cs") == 0x10

            # X carries binary data with gdb's escapes: "}#$*" as the value of release
            value = b"}#$*"
            escaped = b"".join(b"}" + bytes([byte ^ 0x20]) for byte in value)
            assert client.request(b"X%x,4:" % release + escaped) == b"OK"
            assert client.request(b"m%x,4" % release) == value.hex().encode()

            exit_value = (6 + int.from_bytes(value, "little")) & 0xFF
            status = (exit_value << 1) | 1
            assert client.request(b"c") == b"W%02x" % (status & 0xFF)
            client.close()
            result = machine.wait(timeout=10)
        finally:
            stub.close()
    assert result is not None and result.exit_status == status


def test_connecting_stops_a_running_vm_and_detaching_resumes_it(guests: dict[str, Path]) -> None:
    symbols = _symbols(guests["spin"])
    with _machine(guests["spin"]) as machine:
        stub = attach_gdb_stub(machine, "tcp:127.0.0.1:0", wait_for_client=False)
        try:
            machine.start()
            time.sleep(0.2)
            assert not machine.runners[0].paused.is_set()
            client = RawClient(stub.port)
            assert client.request(b"?") == b"T05thread:01;"
            assert machine.runners[0].paused.is_set()
            assert client.read_u32(symbols["counter"][0]) == 6

            second = socket.create_connection(("127.0.0.1", stub.port), timeout=5)
            assert second.recv(16) == b""  # one client at a time
            second.close()

            assert client.request(b"D") == b"OK"
            client.close()
            deadline = time.monotonic() + 5
            while machine.runners[0].paused.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not machine.runners[0].paused.is_set() and machine.running

            client = RawClient(stub.port)  # a new client after the first detached
            assert client.request(b"?") == b"T05thread:01;"
            assert client.request(b"M%x,4:01000000" % symbols["release"][0]) == b"OK"
            assert client.request(b"D") == b"OK"
            client.close()
            result = machine.wait(timeout=10)
        finally:
            stub.close()
    assert result is not None and result.exit_status == ((6 + 1) << 1) | 1


def test_kill_stops_the_vm(guests: dict[str, Path]) -> None:
    with _machine(guests["spin"]) as machine:
        stub = attach_gdb_stub(machine, "tcp:127.0.0.1:0", wait_for_client=True)
        try:
            machine.start()
            client = RawClient(stub.port)
            assert client.request(b"?") == b"T05thread:01;"
            client.send(b"k")
            result = machine.wait(timeout=10)
            client.close()
        finally:
            stub.close()
    assert result is not None and result.exit_status == 137 and "killed by the gdb client" in result.reason


def test_closing_the_stub_releases_a_vm_held_for_a_client(guests: dict[str, Path]) -> None:
    with _machine(guests["one_call"]) as machine:
        stub = attach_gdb_stub(machine, "tcp:127.0.0.1:0", wait_for_client=True)
        machine.start()
        assert machine.runners[0].paused.wait(5) and machine.running
        stub.close()
        result = machine.wait(timeout=10)
        assert machine.rare_exit_handlers.handlers_for(ExitReason.DEBUG) == ()
    assert result is not None and result.exit_status == 59


def test_stub_refuses_remote_addresses_bad_specs_and_busy_ports(guests: dict[str, Path]) -> None:
    with _machine(guests["one_call"]) as machine:
        with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0"):
            GdbStub(machine, ("0.0.0.0", 0))
        with pytest.raises(ConfigError, match="tcp:HOST:PORT"):
            attach_gdb_stub(machine, "127.0.0.1:1234", wait_for_client=False)
        with GdbStub(machine, ("127.0.0.1", 0)) as first:
            first.start()
            with pytest.raises(ConfigError, match="cannot listen"):
                attach_gdb_stub(machine, f"tcp:127.0.0.1:{first.port}", wait_for_client=True)
        assert not machine.runners[0].pause_requested  # the failed attach did not leave the VM held
