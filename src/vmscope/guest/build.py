"""Build the bundled guests from source with the system toolchain, and cache the result.

A build is keyed by a hash of everything that can change its output: the source, header and
linker-script bytes, the flags, and the ``gcc``/``as``/``ld`` version strings. The ELF goes to
``<cache>/<name>-<key>.elf``, where ``<cache>`` is ``$VMSCOPE_CACHE_DIR``, else
``$XDG_CACHE_HOME/vmscope``, else ``~/.cache/vmscope``; a later call with the same key reuses it.
Builds happen in a private temporary directory and the ELF is moved into place with an atomic
rename, so concurrent builds never see a partial file. The output is reproducible: sources are
copied under fixed relative names and the build directory is mapped away (``-ffile-prefix-map``),
so two builds of the same inputs are byte-identical wherever they run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from vmscope.errors import GuestBuildError

GUEST_DIR = Path(__file__).resolve().parent
RUNTIME_DIR = GUEST_DIR / "runtime"
RUNTIME_SOURCES = (RUNTIME_DIR / "entry.S", RUNTIME_DIR / "runtime.c")
RUNTIME_LINKER_SCRIPT = RUNTIME_DIR / "guest.ld"
DEMO_SOURCES = (GUEST_DIR / "demo" / "demo.c",)

DEFAULT_CFLAGS: tuple[str, ...] = (
    "-ffreestanding",
    "-fno-pic",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer",  # leaf frames where the compiler honours it (GCC 12 does not always)
    "-fno-optimize-sibling-calls",  # keep every caller's frame for backtraces
    "-fno-tree-loop-distribute-patterns",  # no memset/memcpy calls synthesized inside memset/memcpy
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-O2",
    "-g",
    "-Wall",
)
LINK_FLAGS: tuple[str, ...] = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,noexecstack")

#: The build directory as it appears in debug info and diagnostics.
MAPPED_BUILD_DIR = "/vmscope-guest"
#: Bump when the build procedure itself changes in a way that changes the output.
BUILDER_VERSION = "1"

_MISSING_TOOL = "{tool} not found: install gcc and binutils (Debian: apt-get install gcc binutils)"


def cache_dir() -> Path:
    """Where built guests are kept (created on first use)."""
    explicit = os.environ.get("VMSCOPE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "vmscope"
    return Path.home() / ".cache" / "vmscope"


def _find_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise GuestBuildError(_MISSING_TOOL.format(tool=tool))
    return path


def _tool_identity(path: str) -> str:
    """The tool's real file, size and modification time: what changes when the toolchain is
    upgraded or replaced. Read with one stat, not by running ``--version`` (three processes,
    about 20 ms, that every start of the demo guest would pay even when its build is cached)."""
    real = os.path.realpath(path)
    try:
        status = os.stat(real)
    except OSError as exc:
        raise GuestBuildError(f"{path}: cannot read the tool: {exc.strerror}") from exc
    return f"{real}:{status.st_size}:{status.st_mtime_ns}"


def _toolchain_identity() -> tuple[str, str]:
    """The gcc path and a string naming the exact gcc, as and ld in use."""
    gcc = _find_tool("gcc")
    identities = [f"gcc={_tool_identity(gcc)}"]
    for tool in ("as", "ld"):
        identities.append(f"{tool}={_tool_identity(_find_tool(tool))}")
    return gcc, "\n".join(identities)


def _staged_names(files: Sequence[Path]) -> list[str]:
    """Relative names under which the files are copied into the build directory.

    ``<parent dir>/<file name>`` reads well in debug info (``runtime/entry.S``); a clash gets
    an index prefix so two files never overwrite each other.
    """
    names: list[str] = []
    for index, path in enumerate(files):
        name = f"{path.parent.name or 'src'}/{path.name}"
        if name in names:
            name = f"{index}-{path.parent.name or 'src'}/{path.name}"
        names.append(name)
    return names


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GuestBuildError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def _headers(include_dirs: Sequence[Path]) -> list[tuple[str, Path]]:
    """(staged relative name, path) of every header in the include directories."""
    found: list[tuple[str, Path]] = []
    for index, directory in enumerate(include_dirs):
        if not directory.is_dir():
            raise GuestBuildError(f"{directory}: include directory does not exist")
        for header in sorted(directory.glob("*.h")):
            found.append((f"include{index}/{header.name}", header))
    return found


def _first_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("undefined reference", "multiple definition", "error:"):
        for line in lines:
            if marker in line:
                return line
    return lines[0] if lines else "(no output)"


def _run(command: list[str], cwd: Path, what: str, name: str, originals: dict[str, Path]) -> None:
    import subprocess  # only a build runs tools; a cached guest's start needs none

    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, timeout=300)
    except OSError as exc:
        raise GuestBuildError(f"building guest {name!r}: cannot run {command[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        line = _first_error_line(result.stderr + result.stdout)
        # name the user's file rather than the staged copy
        staged_names = "|".join(re.escape(staged) for staged in sorted(originals, key=len, reverse=True))
        line = re.sub(
            rf"(?:{re.escape(MAPPED_BUILD_DIR)}/)?({staged_names})",
            lambda match: str(originals[match.group(1)]),
            line,
        )
        raise GuestBuildError(f"building guest {name!r} failed ({what}): {line}")


def build_guest(
    name: str,
    sources: Sequence[Path],
    *,
    linker_script: Path,
    cflags: Sequence[str] = DEFAULT_CFLAGS,
    include_dirs: Sequence[Path] = (),
) -> Path:
    """Compile and link ``sources`` (``.c``/``.S``) into a static ELF; return the cached path.

    ``include_dirs`` are searched for headers (``-I``); their ``*.h`` files are part of the
    cache key. Raises :class:`GuestBuildError` when a tool is missing or a step fails.
    """
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise GuestBuildError(f"invalid guest name {name!r}: use letters, digits, '-', '_' and '.'")
    if not sources:
        raise GuestBuildError(f"building guest {name!r}: no source files")
    sources = [Path(source) for source in sources]
    for source in sources:
        if source.suffix not in (".c", ".S", ".s"):
            raise GuestBuildError(f"{source}: unsupported source type (expected .c, .S or .s)")
    gcc, toolchain = _toolchain_identity()

    staged_sources = _staged_names(sources)
    headers = _headers([Path(d) for d in include_dirs])
    inputs: list[tuple[str, bytes]] = [
        (staged, _read(src, "source")) for staged, src in zip(staged_sources, sources, strict=True)
    ]
    inputs += [(staged, _read(path, "header")) for staged, path in headers]
    inputs.append(("link/guest.ld", _read(Path(linker_script), "linker script")))

    key_hash = hashlib.sha256()
    for part in (BUILDER_VERSION, name, toolchain, "\0".join(cflags), "\0".join(LINK_FLAGS)):
        key_hash.update(part.encode() + b"\0\0")
    for staged, data in inputs:
        key_hash.update(staged.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    key = key_hash.hexdigest()[:20]

    directory = cache_dir()
    output = directory / f"{name}-{key}.elf"
    if output.is_file():
        return output
    try:
        import tempfile  # only for a build

        directory.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=directory))
    except OSError as exc:
        raise GuestBuildError(
            f"{directory}: cannot create the guest cache directory: {exc.strerror}"
        ) from exc
    try:
        for staged, data in inputs:
            target = build_dir / staged
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        originals = {staged: src for staged, src in zip(staged_sources, sources, strict=True)}
        originals.update({staged: path for staged, path in headers})
        prefix_map = f"-ffile-prefix-map={build_dir}={MAPPED_BUILD_DIR}"
        includes = [f"-Iinclude{i}" for i in range(len(include_dirs))]  # search order matters
        objects: list[str] = []
        for index, staged in enumerate(staged_sources):
            obj = f"obj/{index}.o"
            (build_dir / "obj").mkdir(exist_ok=True)
            _run(
                [gcc, *cflags, prefix_map, *includes, "-c", staged, "-o", obj],
                build_dir,
                f"compiling {sources[index].name}",
                name,
                originals,
            )
            objects.append(obj)
        _run(
            [gcc, *cflags, *LINK_FLAGS, "-Wl,-T,link/guest.ld", "-o", "guest.elf", *objects],
            build_dir,
            "linking",
            name,
            originals,
        )
        os.replace(build_dir / "guest.elf", output)
    except OSError as exc:
        raise GuestBuildError(f"building guest {name!r} in {build_dir}: {exc}") from exc
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return output


def build_runtime_guest(name: str, main_c_sources: Sequence[Path], cflags: Sequence[str] = ()) -> Path:
    """Build a guest from its own C file(s) (defining ``guest_main``) linked with the runtime.

    The sources can ``#include "vmscope_guest.h"``; ``cflags`` are added to the defaults.
    """
    return build_guest(
        name,
        [*RUNTIME_SOURCES, *main_c_sources],
        linker_script=RUNTIME_LINKER_SCRIPT,
        cflags=(*DEFAULT_CFLAGS, *cflags),
        include_dirs=[RUNTIME_DIR],
    )


def demo_guest() -> Path:
    """The demo guest ELF (built on first use); see ``demo/demo.c`` for what it does."""
    return build_runtime_guest("demo", list(DEMO_SOURCES))
