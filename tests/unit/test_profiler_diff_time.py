"""``vmscope diff``: estimated per-function time (share x vCPU time), the total, and the HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.unit.test_profiler_diff import B_TIMER_COUNT, COMPUTE_SCALE, TIMER_COUNT, profile_b
from tests.unit.test_profiler_model import build_profile
from vmscope.cli import diff as diff_cli
from vmscope.profiler.diff import diff_text, function_time_changes
from vmscope.profiler.profile_file import save


def profiles_with_durations(a_ms: int, b_ms: int):  # type: ignore[no-untyped-def]
    a, b = build_profile(), profile_b()
    a.metadata.duration_ns, b.metadata.duration_ns = a_ms * 1_000_000, b_ms * 1_000_000
    return a, b


def test_a_function_time_is_its_self_share_times_vcpu_time_and_the_total_is_the_run_time() -> None:
    a, b = profiles_with_durations(100, 150)
    changes, total = function_time_changes(a, b)
    compute = next(c for c in changes if c.name == "compute")
    cpus_a, cpus_b = a.metadata.cpus, b.metadata.cpus
    assert compute.a_ns == pytest.approx(6 / TIMER_COUNT * 100e6 * cpus_a)
    assert compute.b_ns == pytest.approx(6 * COMPUTE_SCALE / B_TIMER_COUNT * 150e6 * cpus_b)
    assert compute.delta_pct == pytest.approx(100 * (compute.b_ns / compute.a_ns - 1))
    assert (total.a_ns, total.b_ns) == (100e6 * cpus_a, 150e6 * cpus_b)
    assert changes[0].name == "compute"  # the largest absolute change first
    assert "total (run time)" in diff_text(a, b)


def test_diff_html_has_the_time_table_with_signed_coloured_deltas(tmp_path: Path) -> None:
    a, b = profiles_with_durations(100, 150)
    save(a, tmp_path / "a.vmprof")
    save(b, tmp_path / "b.vmprof")
    parser = argparse.ArgumentParser(prog="vmscope")
    diff_cli.register(parser.add_subparsers())
    out = tmp_path / "diff.html"
    a_path, b_path = str(tmp_path / "a.vmprof"), str(tmp_path / "b.vmprof")
    args = parser.parse_args(["diff", a_path, b_path, "--format", "html", "-o", str(out)])
    assert args.func(args) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "estimated self time" in page
    compute_row = next(row for row in page.split("<tr>") if ">compute<" in row)
    assert "class='num up'" in compute_row  # compute got slower: a red "+" delta
    assert "<tr class=total>" in page and "total (run time)" in page
