"""The control socket and `vmscope ctl` / `vmscope top` against a real, running VM."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmscope.arch.x86.cpu_state import CpuMode
from vmscope.arch.x86.layout import PDPT_ADDRESS, PML4_ADDRESS
from vmscope.control import ControlClient, ControlError, ControlServer, attach_control_server
from vmscope.profiler import profile_file
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

SRC = str(Path(__file__).resolve().parents[2] / "src")

LOAD_ADDRESS = 0x100000
SPIN_PORT = 0x510
# 64-bit: mov dx, 0x510; loop: out dx, al; jmp loop  -- an endless stream of port exits
SPIN_CODE = b"\x66\xba" + SPIN_PORT.to_bytes(2, "little") + b"\xee\xeb\xfd"
# PML4 slot 1 points at the identity PDPT: guest-virtual ALIAS + x maps guest-physical x
ALIAS = 1 << 39
SPIN_KEY = f"IO port {SPIN_PORT:#x} out"

#: how the subcommands are started until cli/main.py registers them (then: "-m", "vmscope", "ctl")
CTL = ("-m", "vmscope", "ctl")
TOP = ("-m", "vmscope", "top")


@dataclass
class LiveVm:
    machine: Machine
    server: ControlServer
    path: str

    def client(self) -> ControlClient:
        return ControlClient(self.path, timeout=20)


@pytest.fixture
def vm() -> Iterator[LiveVm]:
    with tempfile.TemporaryDirectory(prefix="vmscope-ctl-") as directory:  # short: AF_UNIX paths are limited
        image = Path(directory) / "spin.bin"
        image.write_bytes(SPIN_CODE)
        machine = Machine(mem="16M")
        server: ControlServer | None = None
        try:
            install_platform_devices(machine, serial="none")
            machine.load(image, kind="flat", flat_address=LOAD_ADDRESS, flat_mode=CpuMode.LONG)
            machine.memory.write(PML4_ADDRESS + 8, (PDPT_ADDRESS | 0x3).to_bytes(8, "little"))
            path = os.path.join(directory, "control.sock")
            server = attach_control_server(machine, path)
            machine.start()
            yield LiveVm(machine, server, path)
        finally:
            if server is not None:
                server.close()
            machine.close()


def spin_count(stats: dict[str, Any]) -> int:
    rows = [row for row in stats["totals"]["exit_keys"] if row["key"] == SPIN_KEY]
    return int(rows[0]["count"]) if rows else 0


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def wait_for_exits(client: ControlClient, more_than: int = 0) -> int:
    counts: list[int] = []

    def grown() -> bool:
        counts.append(spin_count(client.call("query-stats", kvm=False)))
        return counts[-1] > more_than

    wait_until(grown)
    return counts[-1]


def run_module(entry: tuple[str, ...], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *entry, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )


def test_socket_is_owner_only_and_removed_on_close(vm: LiveVm) -> None:
    mode = os.lstat(vm.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    vm.server.close()
    assert not os.path.exists(vm.path)
    with pytest.raises(ControlError, match="cannot connect"):
        vm.client()


def test_query_status_of_a_running_vm(vm: LiveVm) -> None:
    with vm.client() as client:
        status = client.call("query-status")
    assert status["state"] == "running"
    assert status["cpus"] == 1
    assert status["kvm_backend"] == vm.machine.kvm.backend
    assert vm.machine.guest is not None and status["guest_kind"] == vm.machine.guest.kind
    assert "long" in status["guest_kind"]
    assert status["uptime_s"] > 0
    assert "exit_status" not in status


def test_pause_stops_exits_and_resume_restarts_them(vm: LiveVm) -> None:
    with vm.client() as client:
        running = wait_for_exits(client)
        assert client.call("pause") == {"state": "paused"}
        assert client.call("query-status")["state"] == "paused"
        held = spin_count(client.call("query-stats", kvm=False))
        assert held >= running
        time.sleep(0.3)
        assert spin_count(client.call("query-stats", kvm=False)) == held
        # while paused the live counter agrees exactly with what the control socket reports
        key_counts = {row["key"]: row["count"] for row in client.call("query-stats")["vcpus"][0]["exit_keys"]}
        from vmscope.vmm.exit_keys import decode_exit_key

        machine_counts = {
            decode_exit_key(key): histogram.count
            for key, histogram in vm.machine.runners[0].stats.handling.items()
        }
        assert key_counts[SPIN_KEY] == machine_counts[("IO", SPIN_PORT, "out")]
        assert client.call("resume") == {"state": "running"}
        wait_for_exits(client, more_than=held)
        assert client.call("query-status")["state"] == "running"


def test_query_stats_counts_grow_and_describe_the_port(vm: LiveVm) -> None:
    with vm.client() as client:
        first_count = wait_for_exits(client)
        time.sleep(0.2)
        stats = client.call("query-stats")
    assert spin_count(stats) > first_count
    (row,) = [row for row in stats["totals"]["exit_keys"] if row["key"] == SPIN_KEY]
    assert (row["reason"], row["address"], row["access"], row["device"]) == ("IO", SPIN_PORT, "out", None)
    assert row["min_ns"] <= row["p50_ns"] <= row["p99_ns"] <= row["max_ns"]
    assert row["min_ns"] <= row["mean_ns"] <= row["max_ns"]
    assert row["total_ns"] >= row["count"] * row["min_ns"]
    assert stats["totals"]["exits"] >= row["count"]
    (vcpu,) = stats["vcpus"]
    assert vcpu["vcpu"] == 0 and vcpu["exits"] == stats["totals"]["exits"]
    assert vcpu["guest_ns"] > 0
    (unclaimed,) = [entry for entry in stats["unclaimed"]["pio"] if entry["address"] == SPIN_PORT]
    assert unclaimed["size"] == 1 and unclaimed["writes"] > 0 and unclaimed["reads"] == 0
    if vm.machine.kvm_stats():  # hosts without KVM_CAP_BINARY_STATS_FD have none
        assert "vcpu0" in stats["kvm"] and "vm" in stats["kvm"]


def test_read_registers_of_a_running_vcpu(vm: LiveVm) -> None:
    with vm.client() as client:
        before = wait_for_exits(client)
        registers = client.call("read-registers", vcpu=0)
        assert LOAD_ADDRESS <= registers["rip"] < LOAD_ADDRESS + len(SPIN_CODE)
        assert registers["rdx"] & 0xFFFF == SPIN_PORT
        assert registers["mode"] == "long"
        assert registers["cr3"] & ~0xFFF == PML4_ADDRESS
        assert registers["cr0"] & 0x8000_0001 == 0x8000_0001  # PG and PE
        assert registers["efer"] & (1 << 10)  # LMA
        assert registers["segments"]["cs"]["selector"] != 0
        assert set(registers) >= {"rax", "rbx", "rsp", "rbp", "r15", "rflags", "cr2", "cr4"}
        # it was running, so the server paused it only for the read
        assert client.call("query-status")["state"] == "running"
        wait_for_exits(client, more_than=before)
        with pytest.raises(ControlError, match="vcpu 1 does not exist") as raised:
            client.call("read-registers", vcpu=1)
        assert raised.value.code == "invalid-argument"


def test_read_registers_keeps_a_paused_vm_paused(vm: LiveVm) -> None:
    with vm.client() as client:
        client.call("pause")
        held = spin_count(client.call("query-stats", kvm=False))
        assert LOAD_ADDRESS <= client.call("read-registers")["rip"] < LOAD_ADDRESS + len(SPIN_CODE)
        client.call("read-memory", address=LOAD_ADDRESS, length=4, virtual=True)
        assert client.call("query-status")["state"] == "paused"
        time.sleep(0.2)
        assert spin_count(client.call("query-stats", kvm=False)) == held
        client.call("resume")


def test_read_memory_physical_and_virtual(vm: LiveVm) -> None:
    with vm.client() as client:
        physical = client.call("read-memory", address=LOAD_ADDRESS, length=len(SPIN_CODE))
        assert bytes.fromhex(physical["data"]) == SPIN_CODE
        assert physical["physical_address"] == LOAD_ADDRESS and physical["virtual"] is False
        # through the guest's page tables: the alias slot maps back onto the code
        virtual = client.call(
            "read-memory", address=ALIAS + LOAD_ADDRESS, length=len(SPIN_CODE), virtual=True
        )
        assert bytes.fromhex(virtual["data"]) == SPIN_CODE
        assert virtual["physical_address"] == LOAD_ADDRESS
        # a read that crosses a page boundary in virtual space
        crossing = client.call("read-memory", address=ALIAS + LOAD_ADDRESS - 3, length=3 + 4, virtual=True)
        assert bytes.fromhex(crossing["data"]) == vm.machine.memory.read(LOAD_ADDRESS - 3, 3) + SPIN_CODE[:4]
        with pytest.raises(ControlError) as raised:
            client.call("read-memory", address=ALIAS + LOAD_ADDRESS, length=4)  # not physical RAM
        assert raised.value.code == "memory-error"
        with pytest.raises(ControlError) as raised:
            client.call("read-memory", address=2 << 39, length=4, virtual=True)  # PML4 slot 2 is empty
        assert raised.value.code == "page-fault"
        with pytest.raises(ControlError) as raised:
            client.call("read-memory", address=0, length=(1 << 20) + 1)
        assert raised.value.code == "invalid-argument"
        big = client.call("read-memory", address=0, length=1 << 20)
        assert len(bytes.fromhex(big["data"])) == 1 << 20
        assert client.call("query-status")["state"] == "running"


def test_profile_start_stop_dump_writes_a_loadable_profile(vm: LiveVm, tmp_path: Path) -> None:
    target = tmp_path / "live.vmprof"
    with vm.client() as client:
        with pytest.raises(ControlError) as raised:
            client.call("profile-dump", path=str(target))
        assert raised.value.code == "no-profile"
        with pytest.raises(ControlError) as raised:
            client.call("profile-stop")
        assert raised.value.code == "no-profile"
        started = client.call("profile-start", frequency_hz=199)
        assert started == {"recording": True, "frequency_hz": 199.0}
        assert client.call("query-status")["profiling"] is True
        with pytest.raises(ControlError) as raised:
            client.call("profile-start")
        assert raised.value.code == "profile-active"
        time.sleep(0.4)
        stopped = client.call("profile-stop")
        assert stopped["samples"] > 0 and stopped["duration_s"] >= 0.3
        dumped = client.call("profile-dump", path=str(target))
        assert dumped["path"] == str(target) and dumped["bytes"] == target.stat().st_size
        assert client.call("query-status")["state"] == "running"
    profile = profile_file.load(target)
    assert len(profile.samples) == stopped["samples"]
    assert profile.metadata.kvm_backend == vm.machine.kvm.backend
    assert any(LOAD_ADDRESS <= sample.ip < LOAD_ADDRESS + len(SPIN_CODE) for sample in profile.samples), (
        "samples point into the guest code"
    )
    details = {stat.detail for stat in profile.exit_stats}
    assert f"port {SPIN_PORT:#x} out" in details
    assert vm.machine.hooks.hooks == ()  # the recorder detached itself


def test_profile_dump_of_a_running_recording_stops_it(vm: LiveVm, tmp_path: Path) -> None:
    with vm.client() as client:
        client.call("profile-start", frequency_hz=0)
        wait_for_exits(client)
        time.sleep(0.1)
        dumped = client.call("profile-dump", path=str(tmp_path / "p.vmprof"))
        assert dumped["samples"] > 0
        assert client.call("query-status")["profiling"] is False
        with pytest.raises(ControlError) as raised:
            client.call("profile-dump", path=str(tmp_path / "missing-dir" / "p.vmprof"))
        assert raised.value.code == "failed" and "cannot write profile" in raised.value.message
    assert profile_file.load(tmp_path / "p.vmprof").samples


def test_errors_come_back_as_json_and_the_connection_keeps_working(vm: LiveVm) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(vm.path)
    sock.sendall(
        b"{this is not json\n"
        b'["a", "list"]\n'
        b'{"id": 2, "command": "format-disk"}\n'
        b'{"id": 3, "command": "read-memory", "arguments": {"address": "0x100000", "length": 4}}\n'
        b'{"id": 4, "command": "read-registers", "arguments": {"vcpu": "zero"}}\n'
        b'{"id": 5, "command": "query-status"}\n'
    )
    data = b""
    while data.count(b"\n") < 6:
        chunk = sock.recv(1 << 16)
        assert chunk
        data += chunk
    responses = [json.loads(line) for line in data.splitlines()]
    assert [(r["id"], r["ok"]) for r in responses] == [
        (None, False), (None, False), (2, False), (3, False), (4, False), (5, True)
    ]  # fmt: skip
    assert [r["error"]["code"] for r in responses[:5]] == [
        "parse-error", "invalid-request", "unknown-command", "invalid-argument", "invalid-argument"
    ]  # fmt: skip
    assert responses[5]["result"]["state"] == "running"
    sock.close()


def test_a_client_leaving_mid_request_or_mid_response_does_not_disturb_another(vm: LiveVm) -> None:
    with vm.client() as steady:
        before = wait_for_exits(steady)
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.connect(vm.path)
        half.sendall(b'{"id": 1, "command": "read-mem')
        # a half-sent request holds nothing: the other client and the guest go on
        assert steady.call("query-status")["state"] == "running"
        after = wait_for_exits(steady, more_than=before)
        half.close()
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.connect(vm.path)
        greedy.sendall(
            b'{"id": 1, "command": "read-memory", "arguments": {"address": 0, "length": 1048576}}\n' * 4
        )
        greedy.recv(1000)  # the first bytes of 8 MiB of answers, then gone
        greedy.close()
        wait_until(lambda: vm.server.client_count == 1)
        assert steady.call("query-status")["state"] == "running"
        wait_for_exits(steady, more_than=after)


def test_two_clients_at_once(vm: LiveVm) -> None:
    failures: list[BaseException] = []
    results: dict[str, list[int]] = {"a": [], "b": []}
    both_connected = threading.Barrier(2, timeout=20)

    def hammer(name: str) -> None:
        counts = results[name]
        try:
            with vm.client() as client:
                both_connected.wait()
                deadline = time.monotonic() + 20
                # at least 25 rounds each, and on until the guest was seen making progress meanwhile
                while len(counts) < 25 or counts[-1] == counts[0]:
                    assert time.monotonic() < deadline, "the guest made no progress while two clients talked"
                    counts.append(spin_count(client.call("query-stats", kvm=False)))
                    data = client.call("read-memory", address=LOAD_ADDRESS, length=len(SPIN_CODE))["data"]
                    assert bytes.fromhex(data) == SPIN_CODE
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=hammer, args=(name,)) for name in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    for counts in results.values():
        assert len(counts) >= 25
        assert counts == sorted(counts) and counts[-1] > counts[0]
    wait_until(lambda: vm.server.client_count == 0)


def test_quit_ends_the_vm_with_status_0(vm: LiveVm) -> None:
    with vm.client() as client:
        wait_for_exits(client)
        assert client.call("quit") == {"stopping": True}
        result = vm.machine.wait(timeout=20)
        assert result is not None
        assert (result.exit_status, result.reason) == (0, "quit via control socket")
        status = client.call("query-status")
        assert (status["state"], status["exit_status"], status["reason"]) == (
            "stopped", 0, "quit via control socket"
        )  # fmt: skip
        with pytest.raises(ControlError) as raised:
            client.call("pause")
        assert raised.value.code == "not-running"
        # a stopped VM can still be inspected
        assert (
            bytes.fromhex(client.call("read-memory", address=LOAD_ADDRESS, length=2)["data"]) == SPIN_CODE[:2]
        )


def test_vmscope_ctl_subprocess(vm: LiveVm, tmp_path: Path) -> None:
    status = run_module(CTL, vm.path, "query-status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "running"
    memory = run_module(CTL, vm.path, "read-memory", f"address={LOAD_ADDRESS:#x}", f"length={len(SPIN_CODE)}")
    assert memory.returncode == 0, memory.stderr
    assert bytes.fromhex(json.loads(memory.stdout)["data"]) == SPIN_CODE
    unknown = run_module(CTL, vm.path, "reboot-host")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "unknown command 'reboot-host'" in unknown.stderr
    bad = run_module(CTL, vm.path, "read-memory", "address=text", "length=4")
    assert bad.returncode == 2 and "'address' must be an integer" in bad.stderr
    missing = run_module(CTL, str(tmp_path / "nothing.sock"), "query-status")
    assert missing.returncode == 2 and "cannot connect" in missing.stderr
    assert run_module(CTL, vm.path, "profile-start").returncode == 0
    time.sleep(0.2)
    dump = run_module(CTL, vm.path, "profile-dump", f"path={tmp_path / 'ctl.vmprof'}")
    assert dump.returncode == 0, dump.stderr
    assert profile_file.load(tmp_path / "ctl.vmprof").exit_stats
    quit_vm = run_module(CTL, vm.path, "quit")
    assert quit_vm.returncode == 0 and json.loads(quit_vm.stdout) == {"stopping": True}
    result = vm.machine.wait(timeout=20)
    assert result is not None and result.exit_status == 0


def test_vmscope_top_subprocess_prints_plain_snapshots(vm: LiveVm) -> None:
    with vm.client() as client:
        wait_for_exits(client)
    top = run_module(TOP, vm.path, "-n", "2", "-d", "0.5", "--kvm")
    assert top.returncode == 0, top.stderr
    snapshots = top.stdout.split("vmscope top")[1:]
    assert len(snapshots) == 2
    for snapshot in snapshots:
        assert "running" in snapshot and "VM exits" in snapshot
        # the exact row: "... out coalesced" is the row of the writes KVM queued instead
        (line,) = [
            line for line in snapshot.splitlines() if line.strip("|").split("|")[0].strip() == SPIN_KEY
        ]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        event, device, total, rate, share, _average = cells
        assert (event, device) == (SPIN_KEY, "")
        assert int(total) > 0
        assert int(rate.replace(",", "")) > 0  # the guest exits all the time
        assert 0 < float(share) <= 100
    assert "\x1b[" not in top.stdout  # not a terminal: no escape sequences
    by_time = run_module(TOP, vm.path, "-n", "1", "-d", "0.1", "--sort", "time")
    assert by_time.returncode == 0 and SPIN_KEY in by_time.stdout
