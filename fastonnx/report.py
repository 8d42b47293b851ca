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
    """One lowered layer; tolerant of the lowering report's exact field names."""
    name = getattr(entry, "name", None) or getattr(entry, "node", None) or str(entry)
    parts = [str(name)]
    sparsity = getattr(entry, "sparsity", None)
    if sparsity is not None:
        parts.append(f"sparsity {sparsity:.2f}")
    block = getattr(entry, "block_shape", None) or getattr(entry, "block", None)
    if block is not None:
        parts.append("block " + "x".join(str(b) for b in block))
    return ", ".join(parts)


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
        if record.name == "quantize" and record.details is not None:
            lines.extend(_quantize_lines(record.details, report, verbose))
        if record.name == "lower_sparse" and record.details is not None:
            if verbose:
                lines.extend(f"      {_sparse_line(e)}" for e in report.lowered)
            lines.extend(_skip_lines(getattr(record.details, "skipped", None) or [], verbose))
        if record.name == "lower_attention" and record.details is not None:
            details = record.details
            lines.extend(_skip_lines(details.kept, verbose, prefix="kept on ORT MHA: "))
            lines.extend(_skip_lines(details.unmerged_qkv, verbose, prefix="Q/K/V not merged: "))
        if record.name == "lower_layer_norm" and record.details is not None:
            lines.extend(_skip_lines(record.details.kept, verbose, prefix="kept on ORT: "))
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


def _quantize_lines(q: Any, report: OptimizeReport, verbose: bool) -> list[str]:
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
    lines.extend(_skip_lines(q.skipped, verbose, prefix="left float: "))
    return lines


def _skip_lines(skipped: list[Any], verbose: bool, prefix: str = "") -> list[str]:
    """Skipped layers with their reasons: each layer when verbose, else grouped by reason
    (encoders repeat the same reason once per layer)."""
    if verbose:
        return [f"      {prefix}{s.node}: {s.reason}" for s in skipped]
    counts = collections.Counter(s.reason for s in skipped)
    return [f"      {prefix}{n} x {reason}" for reason, n in counts.items()]
