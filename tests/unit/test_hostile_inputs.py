"""Inputs an attacker or an unlucky user gives vmscope end in a one-line error and status 2, never a
traceback or unbounded memory use (issue 14's "Found" list)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmscope.devices.char_backends import open_serial_backend
from vmscope.errors import ConfigError, ImageFormatError, VmscopeError
from vmscope.file_limits import read_bounded
from vmscope.memory.guest_memory import check_fits_host
from vmscope.profiler.profile_file import MAGIC, load
from vmscope.symbols import SymbolFileError, load_symbol_file
from vmscope.vmm.virtio_setup import parse_disk_spec

SRC = str(Path(__file__).resolve().parents[2] / "src")


def vmscope_cli(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmscope", *arguments],
        capture_output=True, text=True, timeout=timeout, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def assert_clean_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def write_profile_payload(path: Path, payload: bytes) -> None:
    path.write_bytes(MAGIC + b"1\n" + gzip.compress(payload))


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format_version": 1, "n": ' + b"7" * 5000 + b"}", "5000-digit integer"),
        (b'{"format_version": 1, "n": ' + b"7" * 30 + b"}", "30-digit integer"),
        (b'{"format_version": 1, "n": NaN}', "NaN"),
    ],
)
def test_report_of_a_hostile_profile_is_a_one_line_error(tmp_path: Path, payload: bytes, words: str) -> None:
    path = tmp_path / "hostile.vmprof"
    write_profile_payload(path, payload)
    result = vmscope_cli("report", str(path))
    assert_clean_error(result, f"{path}: corrupt vmscope profile", words)


def test_a_gzip_bomb_profile_is_refused_without_inflating_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vmscope.profiler.profile_file as profile_file

    monkeypatch.setattr(profile_file, "MAX_PROFILE_JSON_BYTES", 1 << 20)
    path = tmp_path / "bomb.vmprof"
    write_profile_payload(path, b" " * (4 << 20))  # 4 MiB of JSON whitespace in a few KiB
    with pytest.raises(VmscopeError, match="decompresses to more than"):
        load(path)


@pytest.mark.parametrize("arguments", [["report", "/dev/zero"], ["diff", "/dev/zero", "/dev/zero"]])
def test_profiles_that_are_devices_are_refused_before_reading(arguments: list[str]) -> None:
    result = vmscope_cli(*arguments, timeout=20)
    assert_clean_error(result, "/dev/zero: is a device, not a profile")


def test_symbol_file_on_a_device_is_refused() -> None:
    with pytest.raises(SymbolFileError, match="/dev/zero: is a device, not a symbol file"):
        load_symbol_file("/dev/zero")


def test_a_symbol_stream_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "kallsyms"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"yes 'ffffffff81000000 T f' > {fifo}"])
    try:
        with pytest.raises(ConfigError, match="more than 1 MiB"):
            read_bounded(str(fifo), 1 << 20, lambda problem: ConfigError(f"{fifo}: {problem}"), "kallsyms")
    finally:
        writer.kill()
        writer.wait()


def test_guest_images_must_be_regular_files() -> None:
    from vmscope.loader import load_guest
    from vmscope.memory.guest_memory import GuestMemory

    memory = GuestMemory.for_size(2 << 20)
    try:
        with pytest.raises(ImageFormatError, match="/dev/zero: is not a regular file"):
            load_guest(memory, Path("/dev/zero"))
    finally:
        memory.close()


@pytest.mark.parametrize(
    ("mem", "words"),
    [("999T", "--mem 999T is more than this host's"), ("100000G", "more than this host's")],
)
def test_more_guest_memory_than_the_host_has_is_a_usage_error(mem: str, words: str) -> None:
    assert_clean_error(vmscope_cli("run", "--mem", mem), words, "give a smaller --mem")


def test_host_memory_bound() -> None:
    check_fits_host(1 << 30, host_bytes=2 << 30)
    with pytest.raises(ConfigError, match="--mem 48G is more than this host's 24G"):
        check_fits_host(48 << 30, host_bytes=24 << 30)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_timeout_must_be_positive(value: str) -> None:
    assert_clean_error(
        vmscope_cli("run", f"--timeout={value}"), "argument --timeout", "positive number of seconds"
    )


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/tmp", "is a directory"),
        ("/dev/null", "is a character device"),
        ("/nonexistent.img", "no such file"),
    ],
)
def test_disk_errors_say_what_is_wrong(path: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        parse_disk_spec(path)
    assert str(caught.value).startswith(f"--disk {path}: ")


@pytest.mark.parametrize("spec", ["file:/nonexistent-dir/console.log", "bogus", "unix:"])
def test_console_errors_name_the_console(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_serial_backend(spec, "console")
    assert str(caught.value).startswith("console ")
    assert "serial" not in str(caught.value)
