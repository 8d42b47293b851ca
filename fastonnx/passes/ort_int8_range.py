"""7-bit weights for the layers that stay on ORT's int8 GEMM, on CPUs where it can saturate.

Without VNNI or AMX, ORT's x86 u8 x s8 GEMM (MLAS) multiplies with vpmaddubsw, which adds two
u8*s8 products into a saturating int16: 255 * 127 * 2 = 64770 does not fit, and a layer's output
is silently wrong wherever an activation pair is large (measured on an AMD EPYC Zen 3, AVX2
only: a 16->12 Gemm with 8-bit weights gave cosine 0.9937 against fp32, one output 1.22 for
1.65). With weights in [-63, 63] no pair can overflow (255 * 63 * 2 = 32130).

So, on such a CPU, every int8 weight that a MatMul/Gemm still reads through DequantizeLinear
(the layers the sparse lowering kept on ORT, or all of them in the ``int8`` preset) is
re-quantized to 7 bits: the weight as dequantized is quantized again with
:func:`~fastonnx.passes.quantize_qdq.quantize_weight` (``reduce_range``). fastonnx's own kernels
are exact on every path and keep their 8 bits. Elsewhere the pass changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from fastonnx.cpu_flags import ort_int8_saturates
from fastonnx.passes.base import Pass, Report, Skip
from fastonnx.passes.cleanup import const_array

_QMAX_7BIT = 63


@dataclass(kw_only=True)
class OrtInt8RangeReport(Report):
    """Weights re-quantized to 7 bits (names of their int8 initializers)."""

    reduced: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {"weights re-quantized to 7 bits": len(self.reduced)}


def _weight_dequantize(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear of an int8 constant that is ``node``'s weight (input 1), if any."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    q = const_array(dq.inputs[0])
    return dq if q is not None and q.dtype == np.int8 and q.ndim == 2 else None


def reduce_weight(dq: ir.Node) -> bool:
    """Re-quantizes the int8 weight of ``dq`` (per tensor or per channel, zero point 0) to
    [-63, 63] in place; False when it is already there or not symmetric."""
    from fastonnx.passes.quantize_qdq import quantize_weight

    q_value, s_value = dq.inputs[0], dq.inputs[1]
    q, scale = const_array(q_value), const_array(s_value)
    zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if scale is None or (zp is not None and np.any(zp != 0)):
        return False
    if int(np.abs(q.astype(np.int16)).max(initial=0)) <= _QMAX_7BIT:
        return False
    axis = dq.attributes.get_int("axis", 1) % 2
    if scale.size == 1:  # per tensor: one scale for the whole weight
        w = q.astype(np.float32) * scale.reshape(())
        flat, s = quantize_weight(w.reshape(1, -1), 0, reduce_range=True)
        new_q, new_s = flat.reshape(q.shape), np.asarray(s.reshape(()), np.float32)
    else:
        shape = [1, 1]
        shape[axis] = -1
        w = q.astype(np.float32) * scale.reshape(shape)
        new_q, new_s = quantize_weight(w, axis, reduce_range=True)
        new_s = new_s.reshape(scale.shape).astype(np.float32)
    q_value.const_value = ir.tensor(new_q.astype(np.int8), name=q_value.name)
    s_value.const_value = ir.tensor(new_s, name=s_value.name)
    return True


def reduce_ort_int8_range(model: ir.Model, *, saturates: bool | None = None) -> OrtInt8RangeReport:
    """Re-quantizes the weights of ORT int8 layers to 7 bits when ``saturates`` (None: this
    CPU's ORT int8 GEMM saturates, :func:`~fastonnx.cpu_flags.ort_int8_saturates`)."""
    report = OrtInt8RangeReport()
    saturates = ort_int8_saturates() if saturates is None else saturates
    if not saturates:
        return report  # ORT's int8 GEMM is exact here (VNNI / AMX): nothing to do
    layers = [n for n in model.graph if n.op_type in ("MatMul", "Gemm") and n.domain == ""]
    done: set[int] = set()  # int8 initializers already handled (a weight shared by layers)
    for node in layers:
        dq = _weight_dequantize(node)
        if dq is None or id(dq.inputs[0]) in done:
            continue
        done.add(id(dq.inputs[0]))
        readers = {id(u.node.inputs[1]) for u in dq.inputs[0].uses()}
        if len(readers) > 1:  # two DequantizeLinear nodes with different scales
            report.skipped.append(
                Skip(node.name or "", "its int8 weight is read with more than one scale")
            )
        elif reduce_weight(dq):
            report.reduced.append(dq.inputs[0].name or "")
    if report.reduced:
        report.notes.append(
            f"{len(report.reduced)} weights left on ORT int8 re-quantized to 7 bits: without "
            "VNNI, ORT's int8 GEMM saturates int16 pair sums of 8-bit ones"
        )
    return report


class OrtInt8RangePass(Pass):
    """:func:`reduce_ort_int8_range` as a configured pass."""

    name = "ort_int8_range"

    def __init__(self, saturates: bool | None = None):
        super().__init__()
        self.saturates = saturates

    def run(self, model: ir.Model) -> OrtInt8RangeReport:
        return reduce_ort_int8_range(model, saturates=self.saturates)
