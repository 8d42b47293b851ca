"""The figures of `fastonnx bench MODEL.onnx` as terminal tables and as a JSON document.

JSON document (``schema`` "fastonnx-bench-model/1"); times in milliseconds:

``model``            the benchmarked ONNX file
``environment``      cpu, cpu_features, onnxruntime, fastonnx, openvino (or null), threads (list),
                     kernel_path, ort_spinning, load_average (1/5/15 min, at the start)
``load_average_after``  the same, at the end
``config``           seq_len, threads, batch_sizes, warmup, runs, seed, variants,
                     calibration, num_samples, parity_samples, eval_data, fastonnx_model,
                     qdq_model, spin
``settings``         [{label "b1 t1", batch, threads}] in the order they were timed
``variants``         one object per variant, in order:
    key, number ("1" ... "6b"), label, runtime, precision, status ("ok" | "failed" |
    "skipped"), error (null or why), model_path, notes [str], prepare_seconds,
    parity: null or {output, samples, cosine_min, cosine_mean, max_abs_diff, error}
        (first output against variant 1's on the same inputs),
    accuracy: null or the fraction of --eval-data rows whose argmax matches ``labels``,
    timings: [{setting, batch, threads, median_ms, p90_ms, runs, throughput_seq_per_s,
        speedup_vs_ort_fp32, speedup_vs_ort_int8, error}] (nulls where not measured;
        speed-up = the reference's median / this median, above 1 is faster)
``profile``          [] or [{variant, threads, batch, runs, run_ms, kernels_ms, trace,
                     ops: [{op_type, ms_per_run, percent, calls_per_run}]}]
``notes``            run-wide notes (calibration source, missing figures)
``chart``            the PNG's path, or null
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from fastonnx.bench.model import BenchResult, Setting, VariantResult
from fastonnx.bench.variants import INT8_REFERENCE_KEY, REFERENCE_KEY

SCHEMA = "fastonnx-bench-model/1"
_PROFILE_ROWS = 12  # op types shown per profile; the rest are summed as "(other)"


# --------------------------------------------------------------------------------------------
# JSON


def _timing_dict(result: BenchResult, r: VariantResult, setting: Setting) -> dict:
    m = r.timings.get(setting)
    t = m.timing if m is not None else None
    return {
        "setting": setting.label,
        "batch": setting.batch,
        "threads": setting.threads,
        "median_ms": t.median_ms if t else None,
        "p90_ms": t.p90_ms if t else None,
        "runs": t.runs if t else 0,
        "throughput_seq_per_s": m.throughput if m is not None else None,
        "speedup_vs_ort_fp32": result.speedup(r, setting, REFERENCE_KEY),
        "speedup_vs_ort_int8": result.speedup(r, setting, INT8_REFERENCE_KEY),
        "error": m.error if m is not None else None,
    }


def to_json(result: BenchResult) -> dict:
    config = result.config

    def path(p) -> str | None:
        return str(p) if p is not None else None

    variants = []
    for r in result.results:
        v = r.variant
        variants.append(
            {
                "key": v.spec.key,
                "number": v.spec.number,
                "label": v.spec.label,
                "runtime": v.spec.runtime,
                "precision": v.precision,
                "status": v.status,
                "error": v.error,
                "model_path": path(v.model_path),
                "notes": list(v.notes),
                "prepare_seconds": round(v.prepare_seconds, 3),
                "parity": dataclasses.asdict(r.parity) if r.parity is not None else None,
                "accuracy": r.accuracy,
                "timings": [_timing_dict(result, r, s) for s in result.settings],
            }
        )
    return {
        "schema": SCHEMA,
        "model": str(config.model),
        "environment": {
            **result.environment,
            "load_average": list(result.environment.get("load_average", ())),
        },
        "load_average_after": list(result.load_average_after),
        "config": {
            "seq_len": config.seq_len,
            "threads": list(config.threads),
            "batch_sizes": list(config.batch_sizes),
            "warmup": config.warmup,
            "runs": config.runs,
            "seed": config.seed,
            "variants": list(config.variants),
            "calibration": path(config.calibration),
            "num_samples": config.num_samples,
            "parity_samples": config.parity_samples,
            "eval_data": path(config.eval_data),
            "fastonnx_model": path(config.fastonnx_model),
            "qdq_model": path(config.qdq_model),
            "spin": config.spin,
        },
        "settings": [
            {"label": s.label, "batch": s.batch, "threads": s.threads} for s in result.settings
        ],
        "variants": variants,
        "profile": [dataclasses.asdict(p) for p in result.profiles],
        "notes": list(result.notes),
        "chart": path(result.chart_path),
    }


def write_json(result: BenchResult, path: Path) -> Path:
    """Write atomically: an interrupted run never leaves half a file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(to_json(result), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Terminal


def format_header(result: BenchResult) -> str:
    env, config = result.environment, result.config
    load = " ".join(f"{v:.2f}" for v in env.get("load_average", ()))
    if result.load_average_after:
        load += " at the start, " + " ".join(f"{v:.2f}" for v in result.load_average_after)
        load += " at the end"
    runtimes = f"onnxruntime {env['onnxruntime']}, fastonnx {env['fastonnx']}"
    runtimes += f", openvino {env['openvino']}" if env.get("openvino") else ", openvino absent"
    return "\n".join(
        [
            f"# {config.model}: S={config.seq_len}, threads {list(config.threads)}, "
            f"throughput batches {list(config.batch_sizes)}, {config.warmup} warm-up + "
            f"{config.runs} interleaved rounds, seed {config.seed}",
            f"# {env['cpu']} | {' '.join(env['cpu_features'])}",
            f"# {runtimes}; fastonnx kernel path {env['kernel_path']}; ORT spinning "
            f"{'during runs' if config.spin else 'off'}; load average {load}",
        ]
    )


def _cell(result: VariantResult, setting: Setting) -> str:
    m = result.timings.get(setting)
    if m is None:
        return "-"
    if m.timing is None:
        return "error"
    if setting.batch == 1:
        return f"{m.timing.median_ms:.2f}/{m.timing.p90_ms:.2f}"
    return f"{m.throughput:.1f}"


def _parity_cells(result: VariantResult) -> tuple[str, str]:
    p = result.parity
    if p is None:
        return "-", "-"
    if p.error:
        return "error", "-"  # the notes say which
    if result.key == REFERENCE_KEY:
        return "ref", "ref"
    return f"{p.cosine_min:.5f}", f"{p.max_abs_diff:.3g}"


def format_table(result: BenchResult) -> str:
    settings = result.settings
    width = max(len(r.variant.spec.label) for r in result.results) + 1
    col = 15
    head1 = (
        f"{'':<3} {'':<{width}} {'':<16}"
        + "".join(f"{s.label:>{col}}" for s in settings)
        + f"{'parity vs 1':>22}{'':>8}"
    )
    head2 = (
        f"{'#':<3} {'variant':<{width}} {'precision':<16}"
        + "".join(f"{('ms med/p90' if s.batch == 1 else 'seq/s'):>{col}}" for s in settings)
        + f"{'cosine':>12}{'max|diff|':>10}{'acc':>8}"
    )
    lines = [head1, head2, "-" * len(head2)]
    for r in result.results:
        v = r.variant
        start = f"{v.spec.number:<3} {v.spec.label:<{width}} {(v.precision or ''):<16}"
        if not v.ok:
            lines.append(f"{start}{v.status}: {v.error}")
            continue
        cosine, diff = _parity_cells(r)
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        cells = "".join(f"{_cell(r, s):>{col}}" for s in settings)
        lines.append(f"{start}{cells}{cosine:>12}{diff:>10}{acc:>8}")
    lines.append(
        "batch 1: median/p90 ms per call; larger batches: sequences/s (batch / median); "
        "parity: worst-sample cosine and max abs diff of the first output against variant 1"
    )
    lines.append("")
    lines.append(format_speedups(result))
    errors = [
        f"  {r.variant.spec.number} {s.label}: {r.timings[s].error}"
        for r in result.results
        for s in settings
        if s in r.timings and r.timings[s].error
    ]
    notes = [
        f"  {r.variant.spec.number} {r.variant.spec.label}: {n}"
        for r in result.results
        for n in r.variant.notes
    ]
    notes += [
        f"  {r.variant.spec.number} parity: {r.parity.error}"
        for r in result.results
        if r.parity and r.parity.error
    ]
    notes += [f"  {n}" for n in result.notes]
    if errors:
        lines += ["", "errors:", *errors]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def format_speedups(result: BenchResult) -> str:
    settings = result.settings
    width = max(len(r.variant.spec.label) for r in result.results) + 1
    head = f"{'#':<3} {'variant':<{width}}" + "".join(
        f"{s.label + ' vs 1':>13}{'vs 3':>7}" for s in settings
    )
    lines = ["speed-up (ratio of medians; above 1 is faster than variant 1 / variant 3)", head]
    for r in result.results:
        if not r.variant.ok:
            continue
        cells = ""
        for s in settings:
            a = result.speedup(r, s, REFERENCE_KEY)
            b = result.speedup(r, s, INT8_REFERENCE_KEY)
            cells += f"{(f'{a:.2f}x' if a else '-'):>13}{(f'{b:.2f}x' if b else '-'):>7}"
        lines.append(f"{r.variant.spec.number:<3} {r.variant.spec.label:<{width}}{cells}")
    return "\n".join(lines)


def format_profiles(result: BenchResult) -> str:
    blocks = []
    labels = {r.key: r.variant.spec.label for r in result.results}
    for p in result.profiles:
        lines = [
            f"profile: {labels.get(p.variant, p.variant)} (batch {p.batch}, {p.threads} thread(s),"
            f" {p.runs} runs): run {p.run_ms:.3f} ms, kernels {p.kernels_ms:.3f} ms "
            f"({max(p.run_ms - p.kernels_ms, 0.0):.3f} ms in ORT between kernels)",
            f"  {'op type':<32}{'ms/run':>9}{'%':>7}{'calls/run':>11}",
        ]
        shown, rest = p.ops[:_PROFILE_ROWS], p.ops[_PROFILE_ROWS:]
        for op in shown:
            lines.append(_profile_row(op.op_type, op.ms_per_run, op.percent, op.calls_per_run))
        if rest:
            ms = sum(o.ms_per_run for o in rest)
            pct = sum(o.percent for o in rest)
            calls = sum(o.calls_per_run for o in rest)
            lines.append(_profile_row(f"(other {len(rest)} op types)", ms, pct, calls))
        lines.append(f"  trace: {p.trace}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _profile_row(name: str, ms: float, percent: float, calls: float) -> str:
    return f"  {name:<32}{ms:>9.3f}{percent:>7.1f}{calls:>11.1f}"
