"""The self-contained HTML report, rendered in headless Chromium (skipped when it is not installed)."""

from __future__ import annotations

import html
import json
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.unit.rigs.profiles import TIMER_SAMPLES, build_profile
from vmscope.profiler.export.html import export_html
from vmscope.profiler.model import Profile, Sample
from vmscope.symbols import SymbolEntry

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1280, 1000)
FRAME_HEIGHT = 18  # px per flame graph level, as drawn by the page's script
HOSTILE_NAME = "</script><script>window.hacked=1</script>"
HOSTILE_ADDRESS = 0x1900

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"headless Chromium ({CHROMIUM}) is not installed; CI installs it"
)


def profile_with_hostile_symbol() -> Profile:
    """The shared synthetic profile plus one sample in a function whose name tries to break the page."""
    profile = build_profile()
    profile.symbol_tables[0].symbols.append(SymbolEntry(HOSTILE_NAME, HOSTILE_ADDRESS, 0x10))
    profile.samples.append(Sample(0, 99_000, HOSTILE_ADDRESS + 2, 0, 0x1000, (HOSTILE_ADDRESS + 2,)))
    return profile


def run_chromium(tmp_path: Path, page: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    index = len(list(tmp_path.glob("chromium-profile-*")))
    user_data = tmp_path / f"chromium-profile-{index}"
    user_data.mkdir()
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
        "--enable-logging=stderr",
        "--v=0",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *mode,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def console_messages(stderr: str) -> list[str]:
    """Chromium logs every page console message (errors, uncaught exceptions) as ``...:CONSOLE...``."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows) of an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    width = height = channels = 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and color in (2, 6), "unexpected PNG layout"
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    offset = 0
    for _ in range(height):
        kind, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        offset += 1 + stride
        if kind == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, previous, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b, c = previous[i], (previous[i - channels] if i >= channels else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


def is_flame_colour(r: int, g: int, b: int) -> bool:
    """The page's flame palette: red 205-254, green 0-229, blue 0-54."""
    return r >= 205 and g <= 229 and b <= 54


def expected_flame_nodes(profile: Profile) -> int:
    """Frames of the default flame graph (timer samples, vCPU root frames): unique stack prefixes + root."""
    symbolizer = profile.symbolizer()
    prefixes = set()
    for sample in profile.samples:
        if sample.origin != "timer":
            continue
        names = [f"vcpu{sample.vcpu}"] + [symbolizer.function_name(a) for a in reversed(sample.frames)]
        prefixes.update(tuple(names[: depth + 1]) for depth in range(len(names)))
    return len(prefixes) + 1


def test_html_is_one_self_contained_file() -> None:
    page = export_html(profile_with_hostile_symbol())
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<(link|img|iframe)\b|\b(src|href)\s*=|@import|url\(", page, re.IGNORECASE)
    assert "<script>" in page and "<style>" in page
    # the hostile name cannot close the data script: "<" is escaped inside the JSON
    assert HOSTILE_NAME not in page and html.escape(HOSTILE_NAME) in page  # tables escape it too
    data = json.loads(page.split('id="vmscope-data">', 1)[1].split("</script>", 1)[0])
    assert [flame["id"] for flame in data["flames"]] == ["cpu", "vcpu0", "vcpu1", "exits"]
    assert data["flames"][0]["root"]["v"] == sum(r for *_, r in TIMER_SAMPLES) + 1
    assert data["timeline"]["tracks"] == ["vcpu0", "vcpu1", "io:virtio-blk0"]


@needs_chromium
def test_console_check_sees_page_errors(tmp_path: Path) -> None:
    """The console-error check below can fail: a broken page shows up in Chromium's log."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction()</script></body></html>")
    result = run_chromium(tmp_path, page, "--dump-dom")
    assert any("undefinedFunction" in line for line in console_messages(result.stderr))


@needs_chromium
@pytest.mark.slow
def test_html_renders_flame_graph_in_chromium(tmp_path: Path) -> None:
    profile = profile_with_hostile_symbol()
    page = tmp_path / "report.html"
    page.write_text(export_html(profile), encoding="utf-8")

    dom = run_chromium(tmp_path, page, "--dump-dom")
    assert console_messages(dom.stderr) == []
    assert 'data-rendered="ok"' in dom.stdout
    frames = re.search(r'data-frames="(\d+)"', dom.stdout)
    assert frames is not None and int(frames.group(1)) == expected_flame_nodes(profile)
    bbox_match = re.search(r'id="flame" data-bbox="([^"]+)"', dom.stdout)
    assert bbox_match is not None
    box: dict[str, Any] = json.loads(html.unescape(bbox_match.group(1)))
    assert box["width"] > 600 and box["height"] >= 3 * FRAME_HEIGHT
    assert box["y"] + box["height"] < WINDOW[1]

    screenshot = tmp_path / "report.png"
    shot = run_chromium(tmp_path, page, f"--screenshot={screenshot}")
    assert console_messages(shot.stderr) == []
    width, height, channels, rows = decode_png(screenshot.read_bytes())
    assert (width, height) == WINDOW
    inside = outside = 0
    left, top, right, bottom = box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]
    for y, row in enumerate(rows):
        for x in range(width):
            pixel = row[x * channels : x * channels + 3]
            if is_flame_colour(pixel[0], pixel[1], pixel[2]):
                if left <= x < right and top <= y < bottom:
                    inside += 1
                else:
                    outside += 1
    # at least the area of the two full-width levels ("all" and the vCPU frames below the stacks)
    assert inside >= box["width"] * (FRAME_HEIGHT - 1) * 2 * 0.8
    assert outside <= inside * 0.01
    # the root frame "all" is the bottom level and spans the whole width
    root_row = rows[bottom - FRAME_HEIGHT // 2]
    root_pixels = sum(
        is_flame_colour(*root_row[x * channels : x * channels + 3]) for x in range(left + 40, right)
    )
    assert root_pixels >= 0.95 * (right - left - 40)


def test_html_shows_the_io_latency_split() -> None:
    from vmscope.profiler.model import IO_PART_NAMES, Span

    profile = profile_with_hostile_symbol()
    parts = dict(zip(IO_PART_NAMES, (2_000, 1_000, 5_000, 1_000, 1_000), strict=True))
    profile.spans.append(Span("io:virtio-blk0", "request:read", 0, 10_000, parts))
    page = export_html(profile)
    table = page.split("I/O request latency, split into its parts", 1)[1].split("</table>", 1)[0]
    assert "virtio-blk0" in table and ">read<" in table and "5.00us (50.00%)" in table
