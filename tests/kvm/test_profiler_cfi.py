"""A frameless leaf: DWARF CFI gives each sample in spin() its real caller (hot_path or cold_path)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from vmscope.guest.build import build_runtime_guest
from vmscope.profiler.model import Profile
from vmscope.profiler.recorder import ProfileRecorder
from vmscope.vmm.machine import Machine
from vmscope.vmm.platform import install_platform_devices

pytestmark = pytest.mark.kvm

GUEST_SRC = Path(__file__).parent / "guest_src" / "leaf_cfi.c"


@pytest.fixture(scope="module")
def leaf_profile() -> Profile:
    # -g keeps .debug_frame (the runtime's link script drops .eh_frame); the leaf gets no frame
    guest = build_runtime_guest("leaf-cfi", [GUEST_SRC], cflags=["-g", "-momit-leaf-frame-pointer"])
    with Machine(mem="64M") as machine:
        install_platform_devices(machine, serial="none")
        machine.load(guest, cmdline="rounds=150 unit=1000000")
        recorder = ProfileRecorder(machine, frequency_hz=499)
        recorder.start()
        result = machine.run(timeout=120)
        profile = recorder.finish()
    assert result.exit_status == 33
    return profile


def caller_paths(profile: Profile) -> Counter[str]:
    symbolizer = profile.symbolizer()
    paths: Counter[str] = Counter()
    for sample in profile.samples:
        if sample.origin != "timer":
            continue
        names = [
            symbol.name if (symbol := symbolizer.lookup(frame)) else hex(frame) for frame in sample.frames
        ]
        if names[0] == "spin":
            paths[";".join(reversed(names[:3]))] += 1
    return paths


def test_leaf_samples_are_attributed_3_to_1_to_their_callers(leaf_profile: Profile) -> None:
    paths = caller_paths(leaf_profile)
    hot, cold = paths["mix;hot_path;spin"], paths["mix;cold_path;spin"]
    leaf_total = sum(paths.values())
    assert leaf_total >= 40, paths
    assert (hot + cold) / leaf_total > 0.9, paths  # nearly every leaf sample keeps its caller
    assert 2.0 <= hot / max(cold, 1) <= 4.5, paths
    assert int(leaf_profile.metadata.extra.get("stacks.cfi", "0")) > 0
