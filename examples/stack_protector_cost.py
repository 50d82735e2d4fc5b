"""What stack canaries cost, function by function: one workload, built four ways, profiled and diffed.

python examples/stack_protector_cost.py [--out DIR] [--repeat N] [--calls N] [--rounds N]

Builds ``vmscope/guest/bench/stack_protector.c`` without protection, with
-fstack-protector-strong, with -fstack-protector-all and with -fcf-protection=return (where the
toolchain has it). It runs each variant ``--repeat`` times without the profiler (variants
interleaved, so host noise spreads over all of them) and prints the guest's own TSC measurement per
function (fastest round, median over the repeats and the spread); then it records each variant once
with the profiler and writes ``vmscope diff`` of each variant against the unprotected build, as text
and as HTML, into ``--out``. The profiler's timer kicks cost the guest time, which is why the
cycle counts come from runs without it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import vmscope
from vmscope.guest.stack_protector import ARRAY_FUNCTIONS, CONTROL_FUNCTION, available_variants, parse_phases
from vmscope.profiler import profile_file
from vmscope.profiler.recorder import ProfileRecorder

FUNCTIONS = (*ARRAY_FUNCTIONS, CONTROL_FUNCTION)


def run_variant(
    image: Path, cmdline: str, serial_log: Path, profile_path: Path | None = None, frequency: float = 0.0
) -> dict[str, float]:
    """Run one variant (under the profiler when ``profile_path`` is given); the guest's
    best-round cycles per call per function."""
    with vmscope.Machine(mem="64M") as vm:
        vmscope.install_platform_devices(vm, serial=f"file:{serial_log}")
        vm.load(image, cmdline=cmdline)
        recorder = None
        if profile_path is not None:
            recorder = ProfileRecorder(vm, frequency_hz=frequency)
            recorder.start()
        result = vm.run(timeout=300)
        profile = recorder.finish() if recorder is not None else None
    if result.exit_status != 33:
        raise SystemExit(f"{image.name}: guest ended with status {result.exit_status}: {result.reason}")
    if profile is not None and profile_path is not None:
        profile.compact_symbols()
        profile_file.save(profile, profile_path)
    rounds = int(cmdline.split("rounds=")[1].split()[0])
    phases = parse_phases(serial_log.read_text())
    return {name: phases[name].best_cycles_per_call(rounds) for name in FUNCTIONS}


def vmscope_cli(*arguments: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vmscope", *arguments], capture_output=True, text=True, check=True
    )
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("stack-protector-cost"), help="output folder")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per variant (default 3)")
    parser.add_argument("--calls", type=int, default=250_000, help="calls per function per round")
    # many short rounds: on a busy host the fastest of them is the least disturbed
    parser.add_argument("--rounds", type=int, default=100, help="rounds (the fastest one counts)")
    parser.add_argument(
        "--profile-rounds", type=int, default=1000, help="rounds of the profiled run (enough samples)"
    )
    parser.add_argument("-F", "--frequency", type=float, default=999.0, help="sampling rate, Hz")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = available_variants()
    cmdline = f"calls={args.calls} rounds={args.rounds}"
    measured: dict[str, dict[str, list[float]]] = {v: {f: [] for f in FUNCTIONS} for v in variants}
    for _ in range(args.repeat):
        for variant, image in variants.items():  # interleaved, so host noise spreads over all variants
            per_call = run_variant(image, cmdline, args.out / f"{variant}.serial")
            for name, value in per_call.items():
                measured[variant][name].append(value)
    for variant, image in variants.items():
        profiled = f"calls={args.calls} rounds={args.profile_rounds}"
        serial = args.out / f"{variant}-profiled.serial"
        run_variant(image, profiled, serial, args.out / f"{variant}.vmprof", args.frequency)

    print(
        f"TSC cycles per call, guest-measured: fastest of {args.rounds} rounds, median of {args.repeat} runs"
    )
    print("(min..max in brackets), change against 'none' from the medians")
    baseline = {name: statistics.median(measured["none"][name]) for name in FUNCTIONS}
    print(f"{'variant':<10}" + "".join(f"{name:>32}" for name in FUNCTIONS))
    for variant, values in measured.items():
        cells = []
        for name in FUNCTIONS:
            median = statistics.median(values[name])
            change = 100.0 * (median / baseline[name] - 1.0)
            cells.append(f"{median:6.2f} [{min(values[name]):.2f}..{max(values[name]):.2f}] {change:+6.1f}%")
        print(f"{variant:<10}" + "".join(f"{cell:>32}" for cell in cells))
    print()
    for variant in variants:
        if variant == "none":
            continue
        a, b = str(args.out / "none.vmprof"), str(args.out / f"{variant}.vmprof")
        text = vmscope_cli("diff", a, b, "--limit", "8")
        (args.out / f"diff-none-{variant}.txt").write_text(text)
        vmscope_cli("diff", a, b, "--format", "html", "-o", str(args.out / f"diff-none-{variant}.html"))
        print(f"=== vmscope diff none {variant} (one profiled run each) ===")
        print(text)
    print(f"diff written to {args.out}/diff-none-*.txt and .html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
