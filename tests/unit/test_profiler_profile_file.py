"""The on-disk profile format: round trip, atomic save, and one-line errors for bad files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from tests.unit.rigs.profiles import build_profile
from vmscope.errors import VmscopeError
from vmscope.profiler.profile_file import FORMAT_VERSION, MAGIC, ProfileFormatError, encode, load, save


def assert_one_line_error(error: VmscopeError, path: Path, words: str) -> None:
    message = str(error)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert words in message


def test_round_trip(tmp_path: Path) -> None:
    profile = build_profile()
    path = tmp_path / "run.vmprof"
    save(profile, path)
    data = path.read_bytes()
    assert data.startswith(MAGIC + f"{FORMAT_VERSION}\n".encode())
    loaded = load(path)
    assert loaded.to_dict() == profile.to_dict()
    assert loaded.samples == profile.samples
    # the JSON inside carries the same version
    document = json.loads(gzip.decompress(data[len(MAGIC) + 2 :]))
    assert document["format_version"] == FORMAT_VERSION


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "run.vmprof"
    path.write_bytes(b"old contents")
    save(build_profile(), path)
    assert load(path).metadata.guest_image == "/images/guest.elf"
    assert os.listdir(tmp_path) == ["run.vmprof"]  # no temporary left behind


def test_save_into_missing_folder_is_a_vmscope_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "run.vmprof"
    with pytest.raises(VmscopeError) as caught:
        save(build_profile(), path)
    assert_one_line_error(caught.value, path, "cannot write")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.vmprof"
    with pytest.raises(VmscopeError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, "cannot read")


@pytest.mark.parametrize("cut", [0, 5, len(MAGIC), len(MAGIC) + 1, len(MAGIC) + 2, len(MAGIC) + 20, -10, -1])
def test_truncated_files(tmp_path: Path, cut: int) -> None:
    data = encode(build_profile())
    path = tmp_path / "cut.vmprof"
    path.write_bytes(data[:cut])
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    expected = "empty file" if cut == 0 else "truncated"
    assert_one_line_error(caught.value, path, expected)
    assert isinstance(caught.value, VmscopeError)


def test_png_is_foreign(tmp_path: Path) -> None:
    path = tmp_path / "shot.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40))
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, "not a vmscope profile (looks like a PNG image)")


def test_gzip_of_something_else_is_foreign(tmp_path: Path) -> None:
    path = tmp_path / "other.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": []}).encode()))
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, "gzip file without the vmscope header")


def test_header_on_foreign_gzip_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "spliced.vmprof"
    path.write_bytes(MAGIC + b"1\n" + gzip.compress(json.dumps({"traceEvents": []}).encode()))
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, "corrupt")


def test_future_version_is_refused(tmp_path: Path) -> None:
    data = encode(build_profile())
    newer = FORMAT_VERSION + 1
    path = tmp_path / "future.vmprof"
    path.write_bytes(MAGIC + f"{newer}\n".encode() + data[len(MAGIC) + 2 :])
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, f"format version {newer} is newer")


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"\x1f\x8b not really gzip", "bad compressed data"),
        (gzip.compress(b"{not json"), "bad JSON"),
        (gzip.compress(b'{"format_version": 1, "metadata": {}}'), "corrupt vmscope profile"),
    ],
)
def test_corrupt_payloads(tmp_path: Path, payload: bytes, words: str) -> None:
    path = tmp_path / "bad.vmprof"
    path.write_bytes(MAGIC + b"1\n" + payload)
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, words)


def test_bad_version_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.vmprof"
    path.write_bytes(MAGIC + b"one\n" + b"x" * 40)
    with pytest.raises(ProfileFormatError) as caught:
        load(path)
    assert_one_line_error(caught.value, path, "corrupt vmscope profile header")
