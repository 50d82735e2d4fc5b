"""The on-disk profile format.

Layout::

    b"VMSCOPE-PROFILE\\n"        16-byte magic
    b"<version>\\n"              format version, ASCII decimal (currently 1)
    gzip(JSON of Profile.to_dict() plus {"format_version": <version>})

A reader refuses files whose version is newer than it knows; the JSON carries the version again
so a header spliced onto foreign gzip data is caught.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from typing import Any

from vmscope.errors import VmscopeError
from vmscope.profiler.model import Profile

MAGIC = b"VMSCOPE-PROFILE\n"
FORMAT_VERSION = 1
#: the version line is short; anything longer is not ours
_MAX_VERSION_LINE = 12

_FOREIGN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\x1f\x8b", "a gzip file without the vmscope header"),
    (b"\x7fELF", "an ELF file"),
    (b"PK\x03\x04", "a zip archive"),
    (b"%PDF", "a PDF document"),
    (b"{", "a JSON/text file"),
)


class ProfileFormatError(VmscopeError):
    """A file is not a readable vmscope profile (foreign, truncated, corrupt or from a newer vmscope)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def encode(profile: Profile) -> bytes:
    """The complete file contents for ``profile``."""
    document: dict[str, Any] = {"format_version": FORMAT_VERSION, **profile.to_dict()}
    payload = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return MAGIC + f"{FORMAT_VERSION}\n".encode("ascii") + gzip.compress(payload, compresslevel=6, mtime=0)


def save(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path_text = os.fspath(path)
    data = encode(profile)
    directory = os.path.dirname(os.path.abspath(path_text))
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path_text)}.", suffix=".tmp", dir=directory
        )
    except OSError as error:
        raise VmscopeError(f"{path_text}: cannot write profile: {error.strerror or error}") from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path_text)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise VmscopeError(f"{path_text}: cannot write profile: {error.strerror or error}") from None


def load(path: str | os.PathLike[str]) -> Profile:
    """Read a profile written by :func:`save`; any problem raises a one-line vmscope error."""
    path_text = os.fspath(path)
    try:
        with open(path_text, "rb") as stream:
            data = stream.read()
    except IsADirectoryError:
        raise VmscopeError(f"{path_text}: is a directory, not a profile") from None
    except OSError as error:
        raise VmscopeError(f"{path_text}: cannot read profile: {error.strerror or error}") from None
    return decode(data, path_text)


def decode(data: bytes, path: str = "<profile>") -> Profile:
    """Parse file contents; ``path`` only names the source in errors."""
    if not data.startswith(MAGIC):
        if not data:
            raise ProfileFormatError(path, "empty file, not a vmscope profile")
        if MAGIC.startswith(data):
            raise ProfileFormatError(path, "truncated vmscope profile (ends inside the header)")
        for signature, description in _FOREIGN_SIGNATURES:
            if data.startswith(signature):
                raise ProfileFormatError(path, f"not a vmscope profile (looks like {description})")
        raise ProfileFormatError(path, "not a vmscope profile (no VMSCOPE-PROFILE header)")
    newline = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_VERSION_LINE)
    if newline < 0:
        if len(data) < len(MAGIC) + _MAX_VERSION_LINE:
            raise ProfileFormatError(path, "truncated vmscope profile (ends inside the header)")
        raise ProfileFormatError(path, "corrupt vmscope profile header (no version line)")
    version_text = data[len(MAGIC) : newline]
    if not version_text.isdigit():
        raise ProfileFormatError(path, f"corrupt vmscope profile header (version {version_text[:12]!r})")
    version = int(version_text)
    if version > FORMAT_VERSION:
        raise ProfileFormatError(
            path,
            f"profile format version {version} is newer than this vmscope understands "
            f"({FORMAT_VERSION}); upgrade vmscope to read it",
        )
    if version < 1:
        raise ProfileFormatError(path, f"unknown profile format version {version}")
    compressed = data[newline + 1 :]
    if not compressed:
        raise ProfileFormatError(path, "truncated vmscope profile (no data after the header)")
    try:
        payload = gzip.decompress(compressed)
    except EOFError:
        raise ProfileFormatError(path, "truncated vmscope profile (compressed data ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile (bad compressed data: {error})") from None
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile (bad JSON: {error})") from None
    if not isinstance(document, dict) or document.get("format_version") != version:
        raise ProfileFormatError(path, "corrupt vmscope profile (format version missing from the data)")
    try:
        return Profile.from_dict(document)
    except ProfileFormatError:
        raise
    except VmscopeError as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile ({error})") from None
