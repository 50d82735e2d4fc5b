"""Differential test: the fallback emulator against the host CPU running the real instruction.

A small C helper (built with gcc in a temporary directory) executes popcnt, lzcnt, tzcnt,
bsf, bsr (16, 32 and 64-bit) and cmpxchg16b on random inputs with random incoming flags and
prints the results and RFLAGS; the emulator runs the same encodings on a synthetic vCPU.
All six arithmetic flags are compared, the ones the SDM leaves undefined included: a guest
should see what this CPU would have done.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.synthetic_cpu import SyntheticCpu
from vmscope.emulate import Completed, emulate

ARITH = 0x8D5  # CF PF AF ZF SF OF
SEED = 1606
CASES = 400

# (name, cpuinfo flag, AT&T mnemonic, encoding of "<op> rax/eax/ax, rcx/ecx/cx" per width)
BIT_OPS = [
    ("popcnt", "popcnt", "popcnt", {16: "66f30fb8c1", 32: "f30fb8c1", 64: "f3480fb8c1"}),
    ("lzcnt", "abm", "lzcnt", {16: "66f30fbdc1", 32: "f30fbdc1", 64: "f3480fbdc1"}),
    ("tzcnt", "bmi1", "tzcnt", {16: "66f30fbcc1", 32: "f30fbcc1", 64: "f3480fbcc1"}),
    ("bsf", "", "bsf", {16: "660fbcc1", 32: "0fbcc1", 64: "480fbcc1"}),
    ("bsr", "", "bsr", {16: "660fbdc1", 32: "0fbdc1", 64: "480fbdc1"}),
]
SUFFIX = {16: ("w", "%w"), 32: ("l", "%k"), 64: ("q", "%q")}

HELPER_HEAD = r"""
#include <stdio.h>
#include <stdint.h>
#include <string.h>
static void cx16(uint64_t *mem, uint64_t *rax, uint64_t *rdx, uint64_t rbx, uint64_t rcx, uint64_t *flags) {
    uint64_t f = *flags;
    __asm__ volatile("pushq %4; popfq; lock cmpxchg16b %0; pushfq; popq %1"
                     : "+m"(*(__int128 *)mem), "=r"(f), "+a"(*rax), "+d"(*rdx) : "r"(f), "b"(rbx), "c"(rcx)
                     : "cc", "memory");
    *flags = f;
}
"""


def _helper_source() -> str:
    lines = [HELPER_HEAD]
    for name, _, mnemonic, _ in BIT_OPS:
        for bits, (suffix, modifier) in SUFFIX.items():
            lines.append(
                f"static void {name}{bits}(uint64_t src, uint64_t *dst, uint64_t *flags) {{\n"
                f"  uint64_t d = *dst, f = *flags;\n"
                f'  __asm__ volatile("pushq %2; popfq; {mnemonic}{suffix} {modifier}3, {modifier}0; '
                f'pushfq; popq %1" : "+r"(d), "=r"(f) : "r"(f), "r"(src) : "cc");\n'
                f"  *dst = d; *flags = f; }}"
            )
    lines.append("int main(void) { char op[16]; unsigned bits;")
    lines.append(" uint64_t a, b, c, d, e, f, mem[2] __attribute__((aligned(16)));")
    lines.append(' while (scanf("%15s %u", op, &bits) == 2) {')
    lines.append('  if (!strcmp(op, "cx16")) {')
    lines.append('   scanf("%lx %lx %lx %lx %lx %lx %lx", &mem[0], &mem[1], &a, &b, &c, &d, &f);')
    lines.append("   cx16(mem, &a, &b, c, d, &f);")
    lines.append('   printf("%lx %lx %lx %lx %lx\\n", mem[0], mem[1], a, b, f); continue; }')
    lines.append('  scanf("%lx %lx %lx", &a, &b, &f); e = b;')
    for name, _, _, _ in BIT_OPS:
        for bits in SUFFIX:
            lines.append(f'  if (!strcmp(op, "{name}") && bits == {bits}) {name}{bits}(a, &e, &f);')
    lines.append('  printf("%lx %lx\\n", e, f); fflush(stdout); }')
    lines.append(" return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the host-CPU helper")
    work = tmp_path_factory.mktemp("differential")
    (work / "helper.c").write_text(_helper_source())
    subprocess.run(["gcc", "-O1", "-o", str(work / "helper"), str(work / "helper.c")], check=True)
    return work / "helper"


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _random_value(rng: random.Random) -> int:
    kind = rng.randrange(4)
    if kind == 0:
        return 0
    if kind == 1:
        return 1 << rng.randrange(64)
    if kind == 2:
        return rng.getrandbits(rng.randrange(1, 65))
    return rng.getrandbits(64)


def _run_helper(helper: Path, requests: list[str]) -> list[list[int]]:
    out = subprocess.run(
        [str(helper)],
        input="\n".join(requests) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [[int(word, 16) for word in line.split()] for line in out.splitlines()]


@pytest.mark.parametrize(("name", "feature", "mnemonic", "encodings"), BIT_OPS, ids=[op[0] for op in BIT_OPS])
def test_bit_counts_match_the_host_cpu(
    helper: Path, name: str, feature: str, mnemonic: str, encodings: dict[int, str]
) -> None:
    if feature and feature not in _cpu_flags():
        pytest.skip(f"the host CPU lacks {feature} ({name} would run as something else or #UD)")
    rng = random.Random(SEED)
    cases = [
        (bits, _random_value(rng), rng.getrandbits(64), 0x2 | (rng.getrandbits(12) & ARITH))
        for _ in range(CASES)
        for bits in (16, 32, 64)
    ]
    answers = _run_helper(
        helper, [f"{name} {bits} {src:x} {dst:x} {flags:x}" for bits, src, dst, flags in cases]
    )
    for (bits, source, destination, flags), (want_destination, want_flags) in zip(
        cases, answers, strict=True
    ):
        cpu = SyntheticCpu()
        cpu.registers.update(rcx=source, rax=destination, rflags=flags)
        outcome = emulate(cpu, bytes.fromhex(encodings[bits]))
        assert isinstance(outcome, Completed)
        case = f"{name}{bits} source {source:#x} destination {destination:#x} flags {flags:#x}"
        assert cpu.registers["rax"] == want_destination, case
        assert cpu.registers["rflags"] & ARITH == want_flags & ARITH, case


def test_cmpxchg16b_matches_the_host_cpu(helper: Path) -> None:
    if "cx16" not in _cpu_flags():
        pytest.skip("the host CPU lacks cmpxchg16b (cx16)")
    rng = random.Random(SEED)
    cases = []
    for _ in range(CASES):
        memory = [rng.getrandbits(64), rng.getrandbits(64)]
        expected = list(memory) if rng.randrange(2) else [rng.getrandbits(64), memory[1]]
        cases.append(
            (memory, expected, rng.getrandbits(64), rng.getrandbits(64), 0x2 | (rng.getrandbits(12) & ARITH))
        )
    requests = [f"cx16 128 {m[0]:x} {m[1]:x} {e[0]:x} {e[1]:x} {b:x} {c:x} {f:x}" for m, e, b, c, f in cases]
    answers = _run_helper(helper, requests)
    for (memory, expected, rbx, rcx, flags), want in zip(cases, answers, strict=True):
        cpu = SyntheticCpu()
        cpu.map(0x60_0000)
        cpu.poke(0x60_0000, memory[0].to_bytes(8, "little") + memory[1].to_bytes(8, "little"))
        cpu.registers.update(rdi=0x60_0000, rax=expected[0], rdx=expected[1], rbx=rbx, rcx=rcx, rflags=flags)
        outcome = emulate(cpu, bytes.fromhex("f0480fc70f"))  # lock cmpxchg16b [rdi]
        assert isinstance(outcome, Completed)
        got_memory = cpu.peek(0x60_0000, 16)
        assert [int.from_bytes(got_memory[:8], "little"), int.from_bytes(got_memory[8:], "little")] == want[
            :2
        ]
        assert (cpu.registers["rax"], cpu.registers["rdx"]) == (want[2], want[3])
        assert cpu.registers["rflags"] & ARITH == want[4] & ARITH
