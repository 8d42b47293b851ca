"""LayerNorm lowering: ``LayerNormalization`` -> ``com.fastonnx::LayerNorm`` where its output
feeds SparseLinear layers that quantize it per row themselves.

In a lowered encoder every LayerNorm but the last feeds the next block's first linear layer
(the packed QKV projection, or the FFN's first layer), and its float output is also the block's
residual. fastonnx's LayerNorm writes both: the float Y and the uint8 activations with per-row
scales and zero points, computed exactly as SparseLinear would quantize Y (docs/operators.md).
The linear layers then read the uint8 tensor (inputs 8 and 9), so X is not read twice more per
layer (range, then quantization) and ORT's LayerNormalization kernel is replaced by one pass.
The numbers are the same as before up to the float rounding of the normalization itself.

A LayerNormalization that feeds no such layer (the encoder's last, or a model without sparse
lowering) is kept on ORT and reported with the reason, as is one this op cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from fastonnx.passes.base import Pass, Report, Skip
from fastonnx.passes.cleanup import replace_value
from fastonnx.runtime import OP_DOMAIN

_SPARSE_LINEAR = ("SparseLinear", "SparseLinearU8")
_X_SCALE = 3  # SparseLinear's static x_scale input slot
_X_ROW_SCALE, _X_ROW_ZERO_POINT = 8, 9  # its per-row quantization inputs


@dataclass(kw_only=True)
class LayerNormLoweringReport(Report):
    """LayerNorms lowered; ``skipped``: LayerNormalization nodes kept on ORT, with the reason."""

    lowered: list[str] = field(default_factory=list)
    linear_layers: int = 0  # SparseLinear layers now reading the LayerNorm's uint8 output

    @property
    def counts(self) -> dict[str, int]:
        return {"LayerNorm": len(self.lowered), "linear layers reading uint8": self.linear_layers}


def _quantizing_consumers(value: ir.Value) -> list[ir.Node]:
    """SparseLinear nodes reading ``value`` as X and quantizing it per row at run time."""
    out = []
    for node, index in value.uses():
        if node.domain != OP_DOMAIN or node.op_type not in _SPARSE_LINEAR or index != 0:
            continue
        inputs = list(node.inputs)
        if len(inputs) > _X_SCALE and inputs[_X_SCALE] is not None:
            continue  # static per-tensor quantization: it reads no row ranges
        out.append(node)
    return out


def plan_layer_norm(node: ir.Node) -> list[ir.Node] | str:
    """The SparseLinear consumers a LayerNormalization node's lowering serves, or why it is
    not lowered (a pure function)."""
    inputs = list(node.inputs) + [None] * max(0, 3 - len(node.inputs))
    x, gamma, beta = inputs[:3]
    if x is None or x.dtype != ir.DataType.FLOAT:
        return "X is not float32"
    rank = x.shape.rank() if x.shape is not None else None
    axis = node.attributes.get_int("axis", -1)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return f"axis={axis} is not the last axis"
    if node.attributes.get_int("stash_type", 1) != 1:
        return "stash_type is not float32"
    for value, what in ((gamma, "scale"), (beta, "bias")):
        if value is None:
            if what == "scale":
                return "no scale input"
            continue
        if value.dtype != ir.DataType.FLOAT or value.shape is None or value.shape.rank() != 1:
            return f"{what} is not a float32 vector"
    if any(list(out.uses()) or out.is_graph_output() for out in node.outputs[1:]):
        return "its Mean / InvStdDev outputs are used"
    consumers = _quantizing_consumers(node.outputs[0])
    if not consumers:
        return "feeds no SparseLinear that quantizes it per row"
    return consumers


def _lower(graph: ir.Graph, node: ir.Node, consumers: list[ir.Node], name: str) -> None:
    x, gamma, beta = (list(node.inputs) + [None] * 3)[:3]
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    inputs = [x, gamma] + ([beta] if beta is not None else [])
    fused = ir.node(
        "LayerNorm", inputs, {"epsilon": float(epsilon)}, domain=OP_DOMAIN, num_outputs=4, name=name
    )
    y, yq, scale, zero_point = fused.outputs
    shape = x.shape
    rows = ir.Shape(shape.dims[:-1]) if shape is not None else None
    for value, dtype, value_shape, suffix in (
        (y, ir.DataType.FLOAT, shape, "y"),
        (yq, ir.DataType.UINT8, shape, "yq"),
        (scale, ir.DataType.FLOAT, rows, "row_scale"),
        (zero_point, ir.DataType.UINT8, rows, "row_zero_point"),
    ):
        value.dtype, value.shape, value.name = dtype, value_shape, f"{name}/{suffix}"
    graph.insert_before(node, fused)
    for linear in consumers:
        linear.replace_input_with(0, yq)
        missing = _X_ROW_ZERO_POINT + 1 - len(linear.inputs)
        if missing > 0:
            linear.resize_inputs(len(linear.inputs) + missing)
        linear.replace_input_with(_X_ROW_SCALE, scale)
        linear.replace_input_with(_X_ROW_ZERO_POINT, zero_point)
    replace_value(node.outputs[0], y)
    graph.remove(node, safe=True)


def lower_layer_norm(model: ir.Model) -> LayerNormLoweringReport:
    """Rewrites every LayerNormalization that feeds per-row-quantizing SparseLinear layers into
    com.fastonnx::LayerNorm, in place."""
    report = LayerNormLoweringReport()
    graph = model.graph
    nodes = [n for n in graph if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")]
    for i, node in enumerate(nodes):
        name = node.name or f"LayerNormalization_{i}"
        plan = plan_layer_norm(node)
        if isinstance(plan, str):
            report.skipped.append(Skip(name, plan))
            continue
        _lower(graph, node, plan, f"{name}/fastonnx")
        report.lowered.append(name)
        report.linear_layers += len(plan)
    if report.lowered:
        model.opset_imports[OP_DOMAIN] = 1
    return report


class LowerLayerNormPass(Pass):
    """:func:`lower_layer_norm` as a pass."""

    name = "lower_layer_norm"

    def run(self, model: ir.Model) -> LayerNormLoweringReport:
        return lower_layer_norm(model)


__all__ = ["LayerNormLoweringReport", "lower_layer_norm", "LowerLayerNormPass", "plan_layer_norm"]
