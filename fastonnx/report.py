"""Plain-text rendering of an :class:`~fastonnx.optimizer.OptimizeReport` for the terminal."""

from __future__ import annotations

import collections
from typing import Any

from fastonnx.optimizer import OptimizeReport


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(shown) if shown else "nothing changed"


def _sparse_line(entry: Any) -> str:
    """One lowered layer (a :class:`~fastonnx.passes.lower_sparse.LoweredLayer`)."""
    block = "x".join(str(b) for b in entry.block_shape)
    return f"{entry.node}, sparsity {entry.sparsity:.2f}, block {block}"


# How each pass's skipped nodes are introduced in the report.
_SKIP_PREFIX = {
    "quantize": "left float: ",
    "lower_sparse": "kept on ORT int8: ",
    "lower_attention": "kept on ORT MHA: ",
    "lower_layer_norm": "kept on ORT: ",
}


def format_report(report: OptimizeReport, *, verbose: bool = False) -> str:
    """A short summary: one line per pass, sizes, and notes. ``verbose`` lists every layer."""
    lines = [f"preset {report.preset}"]
    width = max([len(p.name) for p in report.passes] + [8])
    for record in report.passes:
        # fuse_encoder reports its clean-up as "cleanup.<name>" entries: shown on their own line.
        main = {k: v for k, v in record.counts.items() if not k.startswith("cleanup.")}
        cleanup = {k[8:]: v for k, v in record.counts.items() if k.startswith("cleanup.")}
        lines.append(f"  {record.name:<{width}}  {_counts(main)}  ({record.seconds:.2f} s)")
        if cleanup:
            lines.append(f"      clean-up: {_counts(cleanup)}")
        details = record.details
        if record.name == "quantize":
            lines.extend(_quantize_lines(details, verbose))
        if record.name == "lower_sparse" and verbose:
            lines.extend(f"      {_sparse_line(e)}" for e in details.lowered)
        prefix = _SKIP_PREFIX.get(record.name, "")
        lines.extend(_skip_lines(details.skipped, verbose, prefix=prefix))
        if record.name == "lower_attention":
            lines.extend(_skip_lines(details.unmerged_qkv, verbose, prefix="Q/K/V not merged: "))
    if report.calibration:
        lines.append(f"  calibration  {report.calibration}")
    lines.append(
        f"  weights  {human_bytes(report.weights_bytes_before)} -> "
        f"{human_bytes(report.weights_bytes_after)}"
    )
    if not report.changed:
        lines.append("  model unchanged")
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)


def _quantize_lines(q: Any, verbose: bool) -> list[str]:
    lines = []
    if q.quantized:
        with_out = sum(1 for layer in q.quantized if layer.output_quantized)
        lines.append(
            f"      {len(q.quantized)} linear layers: u8 activations per tensor, s8 weights per "
            f"channel ({q.method})" + (f"; {with_out} with output Q/DQ" if with_out else "")
        )
    if verbose:
        for layer in q.quantized:
            lines.append(
                f"      {layer.node}: {layer.op_type} {list(layer.weight_shape)}, "
                f"x scale {layer.scale:.4g} zero point {layer.zero_point}"
            )
    return lines


def _skip_lines(skipped: list[Any], verbose: bool, prefix: str = "") -> list[str]:
    """Skipped layers with their reasons: each layer when verbose, else grouped by reason
    (encoders repeat the same reason once per layer)."""
    if verbose:
        return [f"      {prefix}{s.node}: {s.reason}" for s in skipped]
    counts = collections.Counter(s.reason for s in skipped)
    return [f"      {prefix}{n} x {reason}" for reason, n in counts.items()]
