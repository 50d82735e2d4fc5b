"""speedscope's JSON file format (https://www.speedscope.app/file-format-schema.json).

One "sampled" profile per vCPU, all sharing one frame list. Samples stay in time order (speedscope's
"Time Order" view) with stacks root first. With a timer frequency the weights are nanoseconds
(one sampling period each), otherwise unitless sample counts.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vmscope.profiler.analysis import FrameNamer, exit_frame_name, select_samples
from vmscope.profiler.model import Profile
from vmscope.version import __version__

SCHEMA_URL = "https://www.speedscope.app/file-format-schema.json"


def speedscope_document(profile: Profile, origin: str = "timer", vcpu: int | None = None) -> dict[str, Any]:
    namer = FrameNamer(profile.symbolizer())
    frames: list[dict[str, Any]] = []
    frame_index: dict[str, int] = {}

    def index_of(name: str, module: str) -> int:
        index = frame_index.get(name)
        if index is None:
            index = frame_index[name] = len(frames)
            frame: dict[str, Any] = {"name": name}
            if module:
                frame["file"] = module
            frames.append(frame)
        return index

    frequency = profile.metadata.sample_frequency_hz
    if frequency > 0 and origin == "timer":
        unit = "nanoseconds"
        weight = 1e9 / frequency
    else:
        unit = "none"
        weight = 1.0
    by_vcpu: dict[int, list[Any]] = {}
    for sample in sorted(select_samples(profile, vcpu, origin), key=lambda s: (s.vcpu, s.time_ns)):
        stack = [index_of(namer.name(address), namer.module(address)) for address in reversed(sample.frames)]
        exit_name = exit_frame_name(sample)
        if exit_name is not None:
            stack.append(index_of(exit_name, ""))
        by_vcpu.setdefault(sample.vcpu, []).append(stack)
    profiles = []
    vcpus = sorted(set(by_vcpu) | ({vcpu} if vcpu is not None else set(profile.vcpus)))
    for index in vcpus:
        stacks = by_vcpu.get(index, [])
        weights = [weight] * len(stacks)
        end = float(sum(weights))
        if unit == "nanoseconds":
            end = max(end, float(profile.metadata.duration_ns))
        profiles.append(
            {
                "type": "sampled",
                "name": f"vcpu{index}",
                "unit": unit,
                "startValue": 0,
                "endValue": end,
                "samples": stacks,
                "weights": weights,
            }
        )
    image = os.path.basename(profile.metadata.guest_image) or "guest"
    return {
        "$schema": SCHEMA_URL,
        "shared": {"frames": frames},
        "profiles": profiles,
        "name": f"vmscope: {image}",
        "activeProfileIndex": 0,
        "exporter": f"vmscope {__version__}",
    }


def export_speedscope(profile: Profile, origin: str = "timer", vcpu: int | None = None) -> str:
    return json.dumps(speedscope_document(profile, origin, vcpu), separators=(",", ":")) + "\n"
