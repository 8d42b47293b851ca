"""The compress report's speed line: the student through fastonnx against the dense model.

ORT's fp32 kernels skip no zeros, so the student's own fp32 export, run in plain ORT, costs what
the dense model costs: it stands in for the dense model without a second export. Both run on
the same real rows (the first dev rows, padded to their longest), one thread, interleaved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def speed_vs_dense(
    exported: Path,
    optimized: Path,
    tokenizer: Any,
    texts: Sequence[str],
    max_len: int,
    *,
    rows: int = 8,
    warmup: int = 5,
    runs: int = 20,
) -> dict[str, Any]:
    """Median and p90 ms per call of the dense model (``exported`` in ORT fp32) and of the
    student (``optimized`` through fastonnx) on ``rows`` real rows, and their ratio."""
    import onnxruntime as ort

    import fastonnx
    from fastonnx.bench.model import time_rounds
    from fastonnx.bench.timing import cpu_model

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    dense = ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    student = fastonnx.make_session(optimized, 1)
    names = [i.name for i in dense.get_inputs()]
    encoded = tokenizer(
        list(texts[:rows]), padding=True, truncation=True, max_length=max_len, return_tensors="np"
    )
    feed = {n: encoded[n].astype(np.int64) for n in names}
    timings, errors = time_rounds(
        {"dense": lambda: dense.run(None, feed), "student": lambda: student.run(None, feed)},
        warmup=warmup,
        runs=runs,
    )
    if errors:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in errors.items()))
    batch, tokens = feed[names[0]].shape
    return {
        "cpu": cpu_model(),
        "batch": int(batch),
        "tokens": int(tokens),
        "threads": 1,
        "warmup": warmup,
        "runs": runs,
        "dense_ort_fp32_ms": {"median": timings["dense"].median_ms, "p90": timings["dense"].p90_ms},
        "student_fastonnx_ms": {
            "median": timings["student"].median_ms,
            "p90": timings["student"].p90_ms,
        },
        "speedup": timings["dense"].median_ms / timings["student"].median_ms,
    }


def format_speed(speed: dict[str, Any]) -> str:
    """One Markdown paragraph for report.md."""
    if "error" in speed:
        return f"Speed: not measured ({speed['error']})."
    dense, student = speed["dense_ort_fp32_ms"], speed["student_fastonnx_ms"]
    return (
        f"Speed on {speed['cpu']} (batch {speed['batch']} x {speed['tokens']} tokens of dev rows, "
        f"{speed['threads']} thread, median / p90 of {speed['runs']} interleaved runs after "
        f"{speed['warmup']} warm-up): dense model in ORT fp32 {dense['median']:.2f} / "
        f"{dense['p90']:.2f} ms, student through fastonnx {student['median']:.2f} / "
        f"{student['p90']:.2f} ms: **{speed['speedup']:.2f}x**."
    )
