"""Per-operator time of an ORT session, from ORT's own profiler (``enable_profiling``).

ORT writes a Chrome-trace JSON: one ``Session``/``model_run`` event per ``run()`` and one
``Node`` event per kernel call (``<node>_kernel_time``, with ``args.op_name`` the op type and
``dur`` in microseconds). Kernel events of the warm-up runs are dropped by keeping only those
inside the timed runs' ``model_run`` windows; the rest are summed per op type.
"""

from __future__ import annotations

import bisect
import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OpShare:
    op_type: str
    ms_per_run: float
    percent: float  # of the summed kernel time
    calls_per_run: float


@dataclass
class OpProfile:
    variant: str
    threads: int
    batch: int
    runs: int
    run_ms: float  # median wall time of one run() as ORT saw it
    kernels_ms: float  # summed kernel time per run; run_ms minus this is ORT's own overhead
    ops: list[OpShare] = field(default_factory=list)  # slowest first
    trace: str = ""  # the trace file (opens in chrome://tracing or Perfetto)


def summarize_trace(events: list[dict], skip_runs: int) -> tuple[int, float, float, list[OpShare]]:
    """(timed runs, median run ms, kernel ms per run, per-op shares) from trace events."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )[skip_runs:]
    if not runs:
        raise ValueError("the ORT trace has no timed model_run events")
    starts = [e["ts"] for e in runs]
    ends = [e["ts"] + e["dur"] for e in runs]

    def in_timed_run(ts: float) -> bool:
        i = bisect.bisect_right(starts, ts) - 1
        return i >= 0 and ts <= ends[i]

    total_us: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not in_timed_run(e["ts"]):
            continue
        op = e.get("args", {}).get("op_name", "?")
        total_us[op] += e["dur"]
        calls[op] += 1
    n = len(runs)
    kernels_us = sum(total_us.values())
    ops = [
        OpShare(op, us / n / 1e3, 100.0 * us / kernels_us if kernels_us else 0.0, calls[op] / n)
        for op, us in total_us.most_common()
    ]
    run_ms = float(np.median([e["dur"] for e in runs])) / 1e3
    return n, run_ms, kernels_us / n / 1e3, ops


def profile_ort(
    key: str,
    model_path: Path,
    *,
    fastonnx: bool,
    feed: dict[str, np.ndarray],
    threads: int,
    batch: int,
    warmup: int,
    runs: int,
    spin: bool,
    trace_prefix: Path,
) -> OpProfile:
    """Run ``warmup + runs`` calls of one model under ORT's profiler and summarize the trace."""
    import onnxruntime as ort

    from fastonnx.bench.variants import adapt_feed, ort_inputs, ort_session_options

    options = ort_session_options(
        threads, fastonnx=fastonnx, spin=spin, profile_prefix=trace_prefix
    )
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    bound = adapt_feed(feed, ort_inputs(session))
    for _ in range(warmup + runs):
        session.run(None, bound)
    trace = Path(session.end_profiling())
    with trace.open() as f:
        events = json.load(f)
    n, run_ms, kernels_ms, ops = summarize_trace(events, skip_runs=warmup)
    return OpProfile(key, threads, batch, n, run_ms, kernels_ms, ops, str(trace))
