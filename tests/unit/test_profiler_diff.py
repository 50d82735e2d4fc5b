"""``vmscope diff``: share changes of functions, exits and exit causes between two profiles."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.unit.rigs.profiles import TIMER_SAMPLES, build_profile
from vmscope.cli import diff as diff_cli
from vmscope.errors import VmscopeError
from vmscope.profiler.diff import diff_text, exit_cause_changes, exit_changes, function_changes
from vmscope.profiler.model import Profile
from vmscope.profiler.profile_file import save

TIMER_COUNT = sum(repeat for *_, repeat in TIMER_SAMPLES)
COMPUTE_SCALE = 3  # B runs compute three times as often
B_TIMER_COUNT = TIMER_COUNT + 6 * (COMPUTE_SCALE - 1)
EXTRA_HALTS = 30


def profile_b() -> Profile:
    profile = build_profile({"compute": COMPUTE_SCALE})
    halt = profile.exit_stat(1, "HLT")
    for _ in range(EXTRA_HALTS):
        halt.record(50_000)
    return profile


def test_function_share_deltas_sorted_by_magnitude() -> None:
    changes = function_changes(build_profile(), profile_b())
    first = changes[0]
    assert first.name == "compute"
    assert first.a_pct == pytest.approx(100 * 6 / TIMER_COUNT)
    assert first.b_pct == pytest.approx(100 * 6 * COMPUTE_SCALE / B_TIMER_COUNT)
    assert first.delta_pp == pytest.approx(first.b_pct - first.a_pct)
    assert first.delta_pp > 0
    idle = next(c for c in changes if c.name == "idle")
    assert idle.delta_pp == pytest.approx(100 * 3 / B_TIMER_COUNT - 100 * 3 / TIMER_COUNT)
    magnitudes = [abs(c.delta_pp) for c in changes]
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_exit_share_deltas() -> None:
    changes = {c.name: c for c in exit_changes(build_profile(), profile_b())}
    a_total, b_total = 135, 135 + EXTRA_HALTS
    halt = changes["HLT"]
    assert halt.a_pct == pytest.approx(100 * 10 / a_total)
    assert halt.b_pct == pytest.approx(100 * (10 + EXTRA_HALTS) / b_total)
    a_time, b_time = 770_000, 770_000 + EXTRA_HALTS * 50_000
    assert halt.other_delta_pp == pytest.approx(
        100 * (500_000 + EXTRA_HALTS * 50_000) / b_time - 100 * 500_000 / a_time
    )
    assert changes["IO port 0x3f8 out"].delta_pp < 0
    assert exit_changes(build_profile(), profile_b())[0].name == "HLT"
    assert all(abs(c.delta_pp) < 1e-9 for c in exit_changes(build_profile(), build_profile()))


def test_exit_cause_deltas_follow_the_exit_totals() -> None:
    changes = {c.name: c for c in exit_cause_changes(build_profile(), profile_b())}
    assert set(changes) == {"HLT <- idle", "IO port 0x3f8 out <- serial_putc", "IO port 0x3f8 out <- compute"}
    assert changes["HLT <- idle"].delta_pp > 0
    assert changes["IO port 0x3f8 out <- serial_putc"].delta_pp < 0


def test_diff_text_shows_the_deltas() -> None:
    text = diff_text(build_profile(), profile_b(), "a.vmprof", "b.vmprof")
    compute_delta = 100 * 6 * COMPUTE_SCALE / B_TIMER_COUNT - 100 * 6 / TIMER_COUNT
    compute_line = next(line for line in text.splitlines() if "| compute " in line)
    assert f"{compute_delta:+.2f}pp" in compute_line
    assert "A = a.vmprof" in text and "B = b.vmprof" in text
    same = diff_text(build_profile(), build_profile())
    assert "Functions (self share of samples): no change" in same
    assert "Exits (share of exits and of handling time): no change" in same


def test_diff_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.vmprof", tmp_path / "b.vmprof"
    save(build_profile(), a)
    save(profile_b(), b)
    parser = argparse.ArgumentParser(prog="vmscope")
    diff_cli.register(parser.add_subparsers())
    args = parser.parse_args(["diff", str(a), str(b), "--limit", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| compute " in out and "| idle " not in out  # --limit 1 keeps the largest change
    assert "more" in out
    missing = parser.parse_args(["diff", str(a), str(tmp_path / "missing.vmprof")])
    with pytest.raises(VmscopeError, match=r"missing\.vmprof: cannot read"):
        missing.func(missing)
