"""Side-by-side timing: variants interleaved round by round, warm-up first, median and p90."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def cpu_model() -> str:
    """The CPU's model name (every figure says which CPU it came from)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith("model name")]
        return lines[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        return platform.processor() or "unknown CPU"


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
