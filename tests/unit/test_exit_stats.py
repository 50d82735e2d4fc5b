"""Exit accounting: the raw exit log folds into exactly the histograms per-exit recording builds."""

from __future__ import annotations

import random

from vmscope.profiler.histogram import LatencyHistogram
from vmscope.vmm.exit_stats import GUEST_ONLY, REBASE, ExitRecord, VcpuExitStats

KEYS = (0x0200_0000_0000_0510, 0x0200_0000_0000_00F4, 0x0600_0000_FEB0_0050, 5 << 56)


Run = tuple[list[ExitRecord], dict[int, LatencyHistogram], LatencyHistogram, int]


def synthetic_run(seed: int, exits: int) -> Run:
    """Records as the exit loop writes them, and the histograms recording each duration gives."""
    rng = random.Random(seed)
    start = clock = 1_000_000
    records: list[ExitRecord] = [(REBASE, start, start, start)]
    handling: dict[int, LatencyHistogram] = {}
    guest = LatencyHistogram()
    kicks = 0
    previous_resume = start
    for _ in range(exits):
        kind = rng.random()
        clock += rng.choice((rng.randint(0, 40), rng.randint(5_000, 20_000), rng.randint(0, 1 << 40)))
        exited = clock
        if kind < 0.03:  # a kick: guest time only, then the loop restarts its clock
            guest.record(exited - previous_resume)
            kicks += 1
            clock += rng.randint(100, 5_000)
            records += [(GUEST_ONLY, exited, exited, exited), (REBASE, clock, clock, clock)]
            previous_resume = clock
            continue
        if kind < 0.05:  # EAGAIN: no guest time recorded
            records.append((REBASE, exited, exited, exited))
            previous_resume = exited
            continue
        key = rng.choice(KEYS)
        clock += rng.choice((rng.randint(0, 31), rng.randint(200, 3_000), rng.randint(0, 1 << 47)))
        handled = clock
        if kind < 0.15:  # exit hooks ran: their time is neither handling nor guest time
            clock += rng.randint(1_000, 50_000)
        guest.record(exited - previous_resume)
        handling.setdefault(key, LatencyHistogram()).record(handled - exited)
        records.append((key, exited, handled, clock))
        previous_resume = clock
    return records, handling, guest, kicks


def test_folding_gives_the_histograms_per_exit_recording_gives() -> None:
    for seed in range(20):
        records, handling, guest, _ = synthetic_run(seed, 3_000)
        stats = VcpuExitStats(0)
        rng = random.Random(seed)
        position = 0
        while position < len(records):  # fold in uneven chunks, as reads and the loop would
            step = rng.randint(1, 700)
            stats.add_records(records[position : position + step])
            position += step
            if rng.random() < 0.5:
                stats.fold()
        assert stats.handling == handling
        assert stats.guest == guest
        assert not stats.log


def test_chunks_of_ordinary_exits_fold_exactly() -> None:
    """The bulk path (no kicks in the chunk), with one key and with several."""
    for keys in (KEYS[:1], KEYS):
        rng = random.Random(len(keys))
        stats = VcpuExitStats(1)
        stats.begin(50)
        stats.fold()
        handling: dict[int, LatencyHistogram] = {}
        guest = LatencyHistogram()
        resume = 50
        for _ in range(5_000):
            exited = resume + rng.randint(0, 30_000)
            handled = exited + rng.randint(0, 3_000)
            key = rng.choice(keys)
            stats.add_records([(key, exited, handled, handled)])
            handling.setdefault(key, LatencyHistogram()).record(handled - exited)
            guest.record(exited - resume)
            resume = handled
        assert stats.handling == handling
        assert stats.guest == guest
        assert stats.total_exits() == 5_000 == sum(h.count for h in handling.values())


def test_readers_see_pending_exits_and_kicks() -> None:
    stats = VcpuExitStats(0)
    stats.begin(0)
    stats.add_records([(KEYS[0], 10, 15, 15)])
    assert stats.count(KEYS[0]) == 1
    assert stats.returns_without_kick == 1
    stats.add_records([(GUEST_ONLY, 40, 40, 40), (REBASE, 60, 60, 60)])
    stats.kicks += 1
    stats.add_records([(KEYS[1], 100, 130, 130)])
    assert stats.returns_without_kick == 2
    assert stats.guest.count == 3
    assert stats.guest.sum == 10 + 25 + 40
    assert stats.handling[KEYS[1]].sum == 30


def test_record_many_equals_record_each() -> None:
    rng = random.Random(7)
    for _ in range(30):
        values = [rng.choice((rng.randint(-100, 40), rng.randint(0, 1 << 20), rng.randint(0, 1 << 50)))
                  for _ in range(rng.randint(1, 400))]  # fmt: skip
        one_by_one, bulk = LatencyHistogram(), LatencyHistogram()
        one_by_one.record(123)
        bulk.record(123)
        for value in values:
            one_by_one.record(value)
        bulk.record_many(values)
        assert bulk == one_by_one


def test_record_many_of_values_in_wide_buckets_equals_record_each() -> None:
    """Batches whose smallest value puts every value in buckets 16 ns wide or wider are counted by
    coarse value: check bucket edges at every such smallest value's scale, and the last bucket."""
    rng = random.Random(11)
    for low_bits in range(9, 50):
        low = 1 << (low_bits - 1)
        for _ in range(3):
            base = rng.randint(low, 2 * low)
            values = [base + rng.choice((0, 1, rng.randint(0, 64), rng.randint(0, base), 1 << 46))
                      for _ in range(rng.randint(1, 300))]  # fmt: skip
            values += [value - value % 16 for value in values[:5]] + [value | 15 for value in values[:5]]
            one_by_one, bulk = LatencyHistogram(), LatencyHistogram()
            for value in values:
                one_by_one.record(value)
            bulk.record_many(values)
            assert bulk == one_by_one, (low_bits, values)
