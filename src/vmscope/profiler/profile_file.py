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
from vmscope.file_limits import MAX_PROFILE_BYTES, MAX_PROFILE_JSON_BYTES, read_bounded
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
        os.chmod(temporary, 0o600)  # guest memory contents (stacks, symbols): owner only
        os.replace(temporary, path_text)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise VmscopeError(f"{path_text}: cannot write profile: {error.strerror or error}") from None


def load(path: str | os.PathLike[str]) -> Profile:
    """Read a profile written by :func:`save`; any problem raises a one-line vmscope error."""
    path_text = os.fspath(path)

    def fail(problem: str) -> VmscopeError:
        return ProfileFormatError(path_text, problem.replace("cannot read:", "cannot read profile:"))

    data = read_bounded(path_text, MAX_PROFILE_BYTES, fail, "profile")
    return decode(data, path_text)


#: no number in a profile needs more digits than 2**64 (20) has; longer ones cost quadratic time
_MAX_INT_DIGITS = 24


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"a {len(text)}-digit integer, longer than any profile value")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a profile value")


def _decompress(compressed: bytes, path: str) -> bytes:
    """gzip data of at most MAX_PROFILE_JSON_BYTES decompressed (a small file may be a gzip bomb)."""
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        payload = decompressor.decompress(compressed, MAX_PROFILE_JSON_BYTES)
    except zlib.error as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile (bad compressed data: {error})") from None
    if decompressor.unconsumed_tail:
        raise ProfileFormatError(
            path, f"corrupt vmscope profile (decompresses to more than {MAX_PROFILE_JSON_BYTES >> 30} GiB)"
        )
    if not decompressor.eof:
        raise ProfileFormatError(path, "truncated vmscope profile (compressed data ends early)")
    return payload


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
    payload = _decompress(compressed, path)
    try:
        document = json.loads(payload, parse_int=_bounded_int, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile (bad JSON: {error})") from None
    except RecursionError:
        # the C decoder stops at the interpreter's recursion limit; real profiles nest ~5 deep
        raise ProfileFormatError(path, "corrupt vmscope profile (JSON nested too deeply)") from None
    except ValueError as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile ({error})") from None
    if not isinstance(document, dict) or document.get("format_version") != version:
        raise ProfileFormatError(path, "corrupt vmscope profile (format version missing from the data)")
    try:
        return Profile.from_dict(document)
    except ProfileFormatError:
        raise
    except VmscopeError as error:
        raise ProfileFormatError(path, f"corrupt vmscope profile ({error})") from None
