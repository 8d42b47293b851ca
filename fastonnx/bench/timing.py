"""Side-by-side timing: variants interleaved round by round, warm-up first, median and p90."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fastonnx.cpu_flags import cpu_fields

# (vendor, family, model range) -> core generation, for CPUs whose VM hides the full name
# ("AMD EPYC"): Zen 4 and Zen 5 differ in cache sizes and 512-bit datapaths, which figures need.
_CORES = [
    ("AuthenticAMD", 25, range(0x00, 0x10), "Zen 3"),
    ("AuthenticAMD", 25, range(0x10, 0x20), "Zen 4"),
    ("AuthenticAMD", 25, range(0x20, 0x60), "Zen 3"),
    ("AuthenticAMD", 25, range(0x60, 0xB0), "Zen 4"),
    ("AuthenticAMD", 26, range(0x00, 0x100), "Zen 5"),
    ("GenuineIntel", 6, range(0x55, 0x56), "Skylake/Cascade Lake SP"),
    ("GenuineIntel", 6, range(0x6A, 0x6B), "Ice Lake SP"),
    ("GenuineIntel", 6, range(0x8F, 0x90), "Sapphire Rapids"),
    ("GenuineIntel", 6, range(0xCF, 0xD0), "Emerald Rapids"),
    ("GenuineIntel", 6, range(0xAD, 0xAE), "Granite Rapids"),
]


def describe_cpu(fields: dict[str, str]) -> str:
    """'model name (family F model M: core)' from /proc/cpuinfo fields of one CPU."""
    name = fields.get("model name", "unknown CPU")
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return name
    core = next(
        (
            c
            for v, f, models, c in _CORES
            if v == fields.get("vendor_id") and f == family and model in models
        ),
        None,
    )
    return f"{name} (family {family} model {model}{': ' + core if core else ''})"


def cpu_model() -> str:
    """The CPU's model name, family and model (every figure says which CPU it came from)."""
    fields = cpu_fields()
    return describe_cpu(fields) if fields else platform.processor() or "unknown CPU"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    runs: int


def time_interleaved(
    variants: Sequence[Callable[[], object]], *, warmup: int, runs: int
) -> list[Timing]:
    """Times each callable `runs` times, interleaving them (A B C A B C ...) so a noisy
    neighbour slows every variant alike."""
    for _ in range(warmup):
        for fn in variants:
            fn()
    samples = [[] for _ in variants]
    for _ in range(runs):
        for i, fn in enumerate(variants):
            t0 = time.perf_counter_ns()
            fn()
            samples[i].append((time.perf_counter_ns() - t0) / 1e6)
    return [Timing(float(np.median(s)), float(np.percentile(s, 90)), len(s)) for s in samples]
