"""Cost of one ORC unwind of a 20-frame kernel stack, with the Debian cloud kernel's real ORC table.

The stack is synthetic (each frame a CALL entry of the real table, return addresses just past the
entry's address); words come from a dict, so this measures the unwinder's own work: table lookups,
rule evaluation and checks. Guest reads through the recorder's page cache add about a microsecond
each on top. Run: PYTHONPATH=src python3 bench/unwind_cost.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kernel_fixture import cached_kernel, kernel_cache_dir, pvh_vmlinux

from vmscope.profiler.kernel.context import KernelProfileInfo
from vmscope.profiler.unwinders.base import Registers
from vmscope.profiler.unwinders.orc import REG_SP, TYPE_CALL, OrcUnwinder

FRAMES = 20


def main() -> int:
    kernel = cached_kernel(kernel_cache_dir())
    if kernel is None:
        print("no cached Debian kernel")
        return 1
    vmlinux = pvh_vmlinux(kernel).path or kernel
    started = time.perf_counter()
    info = KernelProfileInfo.load(vmlinux)
    print(f"loading kallsyms ({len(info.kallsyms)} symbols) and ORC: {time.perf_counter() - started:.2f} s")
    assert info.orc is not None
    table = info.orc
    # pick CALL entries with an sp-based CFA, spread over the text
    picks: list[tuple[int, int]] = []
    for _, address in info.kallsyms.text_symbols():
        entry = table.lookup(address + 8)
        usable = entry and entry.type == TYPE_CALL and entry.sp_reg == REG_SP and entry.bp_reg == 0
        if entry and usable and entry.sp_offset >= 8:
            picks.append((address + 8, entry.sp_offset))
        if len(picks) == FRAMES:
            break
    words: dict[int, int] = {}
    sp = 0xFFFF_C900_0001_0000
    start_sp = sp
    for index, (_, sp_offset) in enumerate(picks):
        cfa = sp + sp_offset
        following = picks[index + 1][0] + 1 if index + 1 < len(picks) else 0
        words[cfa - 8] = following
        sp = cfa
    unwinder = OrcUnwinder(table, max_depth=64)
    start = Registers(picks[0][0], start_sp, 0)
    result = unwinder.unwind(start, words.get)
    rounds = 2000
    began = time.perf_counter()
    for _ in range(rounds):
        unwinder.unwind(start, words.get)
    per_unwind = (time.perf_counter() - began) / rounds
    print(f"{len(result.frames)}-frame ORC unwind ({result.stop}): {per_unwind * 1e6:.1f} us")
    print(f"at the default 99 Hz that is {per_unwind * 99 * 100:.3f}% of one host core per vCPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
