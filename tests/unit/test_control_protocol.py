"""The control protocol without KVM: request parsing, validation, responses, and the socket's framing.

The machine here is a bare placeholder: every request below is answered before a command touches
the machine (parse and validation errors, help) or by the socket layer itself. Commands that act on
a VM are tested on real KVM in tests/kvm/test_control.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmscope.cli.ctl import parse_arguments, parse_value
from vmscope.cli.top import exit_rows, kvm_rows
from vmscope.control import COMMANDS, MAX_READ_LENGTH, MAX_REQUEST_BYTES, ControlClient, ControlError
from vmscope.control.server import ControlProtocol, ControlServer, parse_request
from vmscope.errors import ConfigError, VmscopeError
from vmscope.vmm.machine import Machine

PLACEHOLDER_MACHINE = cast(Machine, SimpleNamespace())


def answer(line: bytes | str) -> dict[str, Any]:
    raw = line.encode() if isinstance(line, str) else line
    response = ControlProtocol(PLACEHOLDER_MACHINE).handle_line(raw)
    assert response.endswith(b"\n") and response.count(b"\n") == 1
    decoded: dict[str, Any] = json.loads(response)
    return decoded


def error_of(line: bytes | str) -> tuple[object, str, str]:
    response = answer(line)
    assert response["ok"] is False and "result" not in response
    return response["id"], response["error"]["code"], response["error"]["message"]


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line", [b"{", b"not json", b'{"id": 1,}', b"\xff\xfe{}", b"NaN", b'{"id": Infinity}']
)
def test_malformed_json_is_a_parse_error_with_null_id(line: bytes) -> None:
    request_id, code, _ = error_of(line)
    assert (request_id, code) == (None, "parse-error")


def test_deeply_nested_json_is_refused_not_crashing() -> None:
    request_id, code, _ = error_of(b"[" * 200_000 + b"]" * 200_000)
    assert code in ("parse-error", "invalid-request") and request_id is None


@pytest.mark.parametrize("document", ["[]", "3", '"query-status"', "null", "true"])
def test_a_request_must_be_an_object(document: str) -> None:
    _, code, message = error_of(document)
    assert code == "invalid-request"
    assert "JSON object" in message


@pytest.mark.parametrize("request_id", [7, "abc", None, {"nested": [1, 2]}, 1.5])
def test_the_id_is_echoed_whatever_its_type(request_id: object) -> None:
    response = answer(json.dumps({"id": request_id, "command": "nosuch"}))
    assert response["id"] == request_id
    response = answer(json.dumps({"id": request_id, "command": "help"}))
    assert response["id"] == request_id and response["ok"] is True


def test_unknown_command_keeps_the_id_and_lists_known_commands() -> None:
    request_id, code, message = error_of('{"id": 4, "command": "reboot-host"}')
    assert (request_id, code) == (4, "unknown-command")
    assert "'reboot-host'" in message and "query-status" in message


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"id": 1}, "'command' must be a string, not null"),
        ({"id": 1, "command": 5}, "'command' must be a string, not an integer"),
        ({"id": 1, "command": "help", "arguments": []}, "'arguments' must be an object, not an array"),
        ({"id": 1, "command": "help", "argument": {}}, "unknown request field 'argument'"),
    ],
)
def test_malformed_request_fields(document: dict[str, Any], fragment: str) -> None:
    request_id, code, message = error_of(json.dumps(document))
    assert (request_id, code) == (1, "invalid-request")
    assert fragment in message


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"address": "0x7c00", "length": 4}, "'address' must be an integer, not a string"),
        ({"address": True, "length": 4}, "'address' must be an integer, not a boolean"),
        ({"address": 1.0, "length": 4}, "'address' must be an integer, not a number"),
        ({"address": 0, "length": 4, "virtual": "yes"}, "'virtual' must be true or false, not a string"),
        ({"address": 0, "length": 4, "vcpu": None}, "'vcpu' must be an integer, not null"),
        ({"address": -1, "length": 4}, "below the minimum 0"),
        ({"address": 0, "length": 0}, "below the minimum 1"),
        ({"address": 0, "length": MAX_READ_LENGTH + 1}, f"above the maximum {MAX_READ_LENGTH}"),
        ({"address": 1 << 64, "length": 1}, "above the maximum"),
        ({"length": 4}, "missing required argument 'address'"),
        ({"address": 0, "length": 4, "size": 4}, "unknown argument 'size'"),
    ],
)
def test_read_memory_arguments_are_validated_before_anything_runs(
    arguments: dict[str, Any], fragment: str
) -> None:
    request_id, code, message = error_of(
        json.dumps({"id": "r", "command": "read-memory", "arguments": arguments})
    )
    assert (request_id, code) == ("r", "invalid-argument")
    assert message.startswith("read-memory: ") and fragment in message


def test_number_arguments_take_ints_and_floats_but_not_booleans() -> None:
    assert parse_request(b'{"command": "profile-start", "arguments": {"frequency_hz": 250}}').arguments == {
        "frequency_hz": 250,
        "exit_samples": True,
    }
    assert parse_request(b'{"command": "profile-start", "arguments": {"frequency_hz": 9.5}}').arguments[
        "frequency_hz"
    ] == pytest.approx(9.5)
    _, code, message = error_of('{"command": "profile-start", "arguments": {"frequency_hz": true}}')
    assert code == "invalid-argument" and "must be a number" in message
    _, code, message = error_of('{"command": "profile-start", "arguments": {"frequency_hz": 20001}}')
    assert code == "invalid-argument" and "above the maximum 20000" in message


def test_defaults_are_filled_and_null_arguments_mean_none() -> None:
    request = parse_request(b'{"id": 2, "command": "read-memory", "arguments": {"address": 16, "length": 2}}')
    assert request.id == 2 and request.command.name == "read-memory"
    assert request.arguments == {"address": 16, "length": 2, "virtual": False, "vcpu": 0}
    assert parse_request(b'{"command": "query-status", "arguments": null}').arguments == {}
    assert parse_request(b'{"command": "query-stats"}').arguments == {"kvm": True}


def test_help_lists_every_command_with_argument_schemas() -> None:
    response = answer('{"id": 0, "command": "help"}')
    assert response["ok"] is True
    listed = {command["name"]: command for command in response["result"]["commands"]}
    assert list(listed) == [command.name for command in COMMANDS]
    for expected in (
        "query-status", "pause", "resume", "quit", "query-stats", "profile-start", "profile-stop",
        "profile-dump", "read-memory", "read-registers", "help",
    ):  # fmt: skip
        assert expected in listed
    read_memory = listed["read-memory"]["arguments"]
    assert read_memory["address"] == {
        "type": "integer",
        "required": True,
        "description": read_memory["address"]["description"],
        "minimum": 0,
        "maximum": (1 << 64) - 1,
    }
    assert read_memory["virtual"]["default"] is False and read_memory["virtual"]["type"] == "boolean"
    assert listed["profile-dump"]["arguments"]["path"]["required"] is True
    assert listed["pause"]["arguments"] == {}


def test_a_failing_command_answers_internal_error_instead_of_raising() -> None:
    # the placeholder machine has none of a Machine's attributes: the handler's AttributeError
    # must come back as an error response
    request_id, code, message = error_of('{"id": 9, "command": "query-status"}')
    assert (request_id, code) == (9, "internal-error")
    assert "AttributeError" in message


# -- the socket ----------------------------------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: keep them short
    with tempfile.TemporaryDirectory(prefix="vmscope-ctl-") as directory:
        yield Path(directory)


@pytest.fixture
def server(socket_dir: Path) -> Iterator[ControlServer]:
    control = ControlServer(PLACEHOLDER_MACHINE, socket_dir / "control.sock")
    control.start()
    yield control
    control.close()


def raw_connect(path: str | Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(os.fspath(path))
    return sock


def read_lines(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(1 << 16)
        assert chunk, f"connection closed before {count} lines arrived: {data[-200:]!r}"
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def test_socket_is_owner_only_even_under_a_permissive_umask(socket_dir: Path) -> None:
    path = socket_dir / "open.sock"
    previous = os.umask(0)
    try:
        control = ControlServer(PLACEHOLDER_MACHINE, path)
        control.start()
    finally:
        os.umask(previous)
    try:
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    finally:
        control.close()
    assert not path.exists()


def test_refuses_to_replace_a_regular_file(socket_dir: Path) -> None:
    path = socket_dir / "important.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket; refusing to replace it"):
        ControlServer(PLACEHOLDER_MACHINE, path).start()
    assert path.read_text() == "keep me"


def test_refuses_a_symlink_and_a_directory(socket_dir: Path) -> None:
    target = socket_dir / "target"
    target.write_text("x")
    link = socket_dir / "link.sock"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(PLACEHOLDER_MACHINE, link).start()
    assert link.is_symlink() and target.read_text() == "x"
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(PLACEHOLDER_MACHINE, socket_dir).start()


def test_replaces_a_stale_socket_but_not_a_live_one(socket_dir: Path) -> None:
    path = socket_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens: what a killed VMM leaves behind
    with ControlServer(PLACEHOLDER_MACHINE, path) as control:
        control.start()
        with ControlClient(path) as client:
            assert "commands" in client.call("help")
        with pytest.raises(ConfigError, match="another process is listening"):
            ControlServer(PLACEHOLDER_MACHINE, path).start()
        with ControlClient(path) as client:  # the live server was left alone
            assert "commands" in client.call("help")
    assert not path.exists()


def test_close_leaves_a_file_that_replaced_the_socket(socket_dir: Path) -> None:
    path = socket_dir / "moved.sock"
    control = ControlServer(PLACEHOLDER_MACHINE, path)
    control.start()
    path.unlink()
    path.write_text("someone else's")
    control.close()
    assert path.read_text() == "someone else's"


def test_pipelined_requests_are_answered_in_order(server: ControlServer) -> None:
    sock = raw_connect(server.path)
    requests = [
        b'{"id": 1, "command": "help"}',
        b"garbage",
        b"",  # blank lines are skipped
        b'{"id": 3, "command": "nosuch"}',
        b'{"id": 4, "command": "help"}\r',
    ]
    sock.sendall(b"\n".join(requests) + b"\n")
    first, second, third, fourth = read_lines(sock, 4)
    assert (first["id"], first["ok"]) == (1, True)
    assert (second["id"], second["error"]["code"]) == (None, "parse-error")
    assert (third["id"], third["error"]["code"]) == (3, "unknown-command")
    assert (fourth["id"], fourth["ok"]) == (4, True)
    sock.close()


def test_a_request_split_across_writes_is_reassembled(server: ControlServer) -> None:
    sock = raw_connect(server.path)
    for piece in (b'{"id": "sp', b'lit", "comm', b'and": "help"}', b"\n"):
        sock.sendall(piece)
        time.sleep(0.02)
    (response,) = read_lines(sock, 1)
    assert response["id"] == "split" and response["ok"] is True
    sock.close()


def test_oversize_line_gets_an_error_and_the_connection_keeps_working(server: ControlServer) -> None:
    sock = raw_connect(server.path)
    sock.sendall(b'{"id": 1, "command": "help", "arguments": {"pad": "' + b"x" * (MAX_REQUEST_BYTES + 10))
    (refused,) = read_lines(sock, 1)
    assert refused["ok"] is False and refused["error"]["code"] == "line-too-long"
    # the rest of the long line is dropped up to its newline; the next request is served
    sock.sendall(b"y" * 50_000 + b'"}}\n{"id": 2, "command": "help"}\n')
    (after,) = read_lines(sock, 1)
    assert (after["id"], after["ok"]) == (2, True)
    sock.close()


def test_oversize_line_arriving_whole_is_refused(server: ControlServer) -> None:
    sock = raw_connect(server.path)
    sock.sendall(b"[" + b"1," * (MAX_REQUEST_BYTES // 2 + 5) + b"1]\n" + b'{"id": 5, "command": "help"}\n')
    refused, after = read_lines(sock, 2)
    assert refused["error"]["code"] == "line-too-long"
    assert (after["id"], after["ok"]) == (5, True)
    sock.close()


def test_half_a_request_then_disconnect_leaves_other_clients_alone(server: ControlServer) -> None:
    with ControlClient(server.path) as steady:
        assert steady.call("help")
        for _ in range(20):
            quitter = raw_connect(server.path)
            quitter.sendall(b'{"id": 1, "command": "he')
            quitter.close()
        deaf = raw_connect(server.path)
        deaf.sendall(b'{"id": 1, "command": "help"}\n' * 50)
        deaf.close()  # gone before reading: the server's sends fail and it drops the client
        assert steady.call("help")
        deadline = time.monotonic() + 5
        while server.client_count > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.client_count == 1
        assert steady.call("help")


def test_a_client_that_sends_eof_still_gets_its_answers(server: ControlServer) -> None:
    sock = raw_connect(server.path)
    sock.sendall(b'{"id": 1, "command": "help"}\n{"id": 2, "command": "nosuch"}\n{"id": 3, "comm')
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    responses = [json.loads(line) for line in data.splitlines()]
    assert [response["id"] for response in responses] == [1, 2]
    sock.close()


def test_client_raises_a_vmscope_error_with_the_code(server: ControlServer) -> None:
    with ControlClient(server.path) as client:
        with pytest.raises(ControlError) as raised:
            client.call("read-memory", address="zero", length=1)
        assert raised.value.code == "invalid-argument"
        assert isinstance(raised.value, VmscopeError)
        assert "'address' must be an integer" in str(raised.value)
        assert client.call("help")["commands"]


def test_client_reports_a_missing_socket(socket_dir: Path) -> None:
    with pytest.raises(ControlError, match="cannot connect to control socket"):
        ControlClient(socket_dir / "absent.sock")


# -- vmscope ctl and top helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0x7c00", 0x7C00),
        ("16", 16),
        ("-3", -3),
        ("2.5", 2.5),
        ("true", True),
        ("False", False),
        ("null", None),
        ("guest.vmprof", "guest.vmprof"),
        ('"123"', "123"),
        ("[1, 2]", [1, 2]),
        ("nan", "nan"),
    ],
)
def test_ctl_values(text: str, value: object) -> None:
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_ctl_arguments() -> None:
    assert parse_arguments(["address=0x10", "length=4", "virtual=true"]) == {
        "address": 16,
        "length": 4,
        "virtual": True,
    }
    assert parse_arguments(["path=out.vmprof"]) == {"path": os.path.abspath("out.vmprof")}
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_arguments(["length"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_arguments(["a=1", "a=2"])
    with pytest.raises(ConfigError, match="does not parse"):
        parse_arguments(["a={oops"])


def _stats(sampled_ns: int, rows: list[tuple[str, int, int]], kvm_exits: int = 0) -> dict[str, Any]:
    exit_keys = [
        {"key": key, "device": None, "count": count, "total_ns": total_ns, "mean_ns": total_ns / count}
        for key, count, total_ns in rows
    ]
    return {
        "sampled_ns": sampled_ns,
        "state": "running",
        "uptime_s": sampled_ns / 1e9,
        "totals": {"exit_keys": exit_keys},
        "vcpus": [{"vcpu": 0, "exit_keys": exit_keys}],
        "kvm": {"vm": {"remote_tlb_flush": 5}, "vcpu0": {"exits": kvm_exits, "halt_poll_hist": [1, 2]}},
    }


def test_top_rates_and_time_share_cover_the_interval() -> None:
    before = _stats(1_000_000_000, [("IO port 0x3f8 out", 100, 100_000), ("HLT", 50, 900_000)], kvm_exits=10)
    after = _stats(
        1_500_000_000,
        [("IO port 0x3f8 out", 600, 400_000), ("HLT", 60, 1_000_000), ("MMIO 0xfee00000 write", 40, 600_000)],
        kvm_exits=710,
    )
    rows = {row.event: row for row in exit_rows(before, after)}
    assert rows["IO port 0x3f8 out"].rate == pytest.approx(1000.0)  # 500 in 0.5 s
    assert rows["HLT"].rate == pytest.approx(20.0)
    assert rows["MMIO 0xfee00000 write"].rate == pytest.approx(80.0)  # new key: all of it is new
    # handling time in the interval: 300 us + 100 us + 600 us
    assert rows["IO port 0x3f8 out"].time_share == pytest.approx(30.0)
    assert rows["HLT"].time_share == pytest.approx(10.0)
    assert rows["MMIO 0xfee00000 write"].time_share == pytest.approx(60.0)
    assert rows["IO port 0x3f8 out"].mean_ns == pytest.approx(600.0)
    assert exit_rows(before, after, sort="count")[0].event == "IO port 0x3f8 out"
    assert exit_rows(before, after, sort="time")[0].event == "MMIO 0xfee00000 write"
    assert exit_rows(before, after, sort="rate")[-1].event == "HLT"
    assert [row.total for row in exit_rows(before, after, vcpu=0)] == [600, 60, 40]
    with pytest.raises(ConfigError, match="no such vCPU"):
        exit_rows(before, after, vcpu=3)
    kvm = kvm_rows(before, after)
    assert [(row.name, row.total, row.rate) for row in kvm] == [("exits", 710, pytest.approx(1400.0))]
