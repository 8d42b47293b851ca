"""Sparse lowering: quantized linear layers with sparse weights -> com.fastonnx::SparseLinear.

Glossary: X is the layer's activation input, W its int8 weight ([K, N] for MatMul, K input
features, N output features / channels), Y its float output.

Matched (the QDQ form written by ``quantize_qdq``, or weight-only DQ)::

    X ─Q─DQ─┐                                                  X ─┐
    W_s8 ─DQ(per channel)─ MatMul ─[Add bias]─[Gelu | Add R]  =>  SparseLinear(X, W_packed,
            (or Gemm, or MatMul ─ BiasGelu)                        bias, x_scale, x_zero_point,
                                                                   R, activation)

R is a residual of the output's exact (static or symbolic) shape.

By default, and always without a Q/DQ pair on X, the op quantizes X per row at run time. The
weight is re-packed into fastonnx's portable blob (see docs/operators.md) when its sparsity,
counted in the 1x4 groups the kernels skip, is at least ``min_sparsity``; denser layers stay on
ORT's int8 path. By default that threshold is 0 on CPUs whose fastonnx kernels run dense layers
at parity with ORT's int8 (AVX-512 VNNI, AMX) and 0.5 elsewhere (:func:`auto_min_sparsity`).
Every layer that is not lowered is reported with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from fastonnx.passes.base import Pass, Report, Skip
from fastonnx.passes.cleanup import const_array, replace_value
from fastonnx.runtime import OP_DOMAIN


@dataclass(frozen=True)
class LoweredLayer:
    node: str
    n: int
    k: int
    sparsity: float  # fraction of all-zero 1x4 groups of W ([N, K] layout)
    block_shape: tuple[int, int]
    static_input: bool  # X quantized with calibrated scale (else dynamic per row)
    bias: bool
    gelu: bool
    residual: bool
    packed_bytes: int


@dataclass(kw_only=True)
class SparseLoweringReport(Report):
    """Layers lowered to SparseLinear; ``skipped``: linear layers kept, with the reason."""

    min_sparsity: float
    lowered: list[LoweredLayer] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {"SparseLinear": len(self.lowered)}


@dataclass(frozen=True)
class _Match:
    """A linear layer and everything that folds into one SparseLinear node."""

    matmul: ir.Node
    x: ir.Value  # float X, or uint8 X when only a DQ precedes the layer
    x_scale: ir.Value | None
    x_zero_point: ir.Value | None
    weight: np.ndarray  # int8 [N, K]
    scale: np.ndarray  # float32 [N]
    bias: np.ndarray | None
    gelu: bool
    residual: ir.Value | None
    output: ir.Value  # the value SparseLinear's output replaces
    folded: tuple[ir.Node, ...]  # nodes after the MatMul that fold into the op


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"):
        return node
    return None


def _sole_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _match_weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(W int8 [N, K], scale float32 [N]) from the layer's DequantizeLinear weight."""
    dq = _producer(node.inputs[1], "DequantizeLinear")
    if dq is None:
        return "weight is not a DequantizeLinear of an int8 constant (run the int8 preset first)"
    wq, scale, zero_point = (list(dq.inputs) + [None, None])[:3]
    w = const_array(wq)
    s = const_array(scale)
    if w is None or s is None:
        return "quantized weight or its scale is not a constant"
    if w.dtype != np.int8 or w.ndim != 2:
        return f"weight is {w.dtype} with {w.ndim} dims; SparseLinear takes a 2-D int8 weight"
    zp = const_array(zero_point)
    if zp is not None and np.any(zp != 0):
        return "weight zero point is not 0 (SparseLinear takes symmetric weights)"
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
    w_nk = w if transposed else w.T  # SparseLinear wants PyTorch's [out, in]
    n = w_nk.shape[0]
    channel_axis = 0 if transposed else 1
    axis = dq.attributes.get_int("axis", 1)
    if s.size == 1:
        s = np.full(n, float(s.reshape(())), np.float32)
    elif s.ndim != 1 or s.size != n or axis % 2 != channel_axis:
        return f"weight scale of shape {s.shape} (axis {axis}) is not per output channel"
    return np.ascontiguousarray(w_nk), s.astype(np.float32)


def _match_input(node: ir.Node) -> tuple[ir.Value, ir.Value | None, ir.Value | None] | str:
    x = node.inputs[0]
    dq = _producer(x, "DequantizeLinear")
    if dq is None:
        return (x, None, None)  # float X: the op quantizes it dynamically per row
    xq, scale, zero_point = (list(dq.inputs) + [None, None])[:3]
    s, zp = const_array(scale), const_array(zero_point)
    if s is None or s.size != 1:
        return "activation scale is not a constant scalar"
    if zp is not None and (zp.size != 1 or zp.dtype != np.uint8):
        return "activation zero point is not a uint8 scalar"
    q = _producer(xq, "QuantizeLinear")
    if q is not None and q.inputs[1] is scale and (zp is None or q.inputs[2] is zero_point):
        return (q.inputs[0], scale, zero_point)  # Q -> DQ: the op quantizes X the same way
    if xq is not None and xq.dtype == ir.DataType.UINT8:
        return (xq, scale, zero_point)  # already uint8: the op reads it directly
    return "activation DequantizeLinear does not read a uint8 tensor"


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """True when both shapes are known and equal dimension by dimension (symbols included)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(
        x is not None and str(x) not in ("", "None") and x == y
        for x, y in zip(a.shape.dims, b.shape.dims, strict=True)
    )


def _match_epilogue(node: ir.Node, n: int):
    """Bias, GELU and residual following the layer:
    (bias [N] | None, gelu, residual | None, output, folded nodes)."""
    y = node.outputs[0]
    bias = None
    gelu = False
    folded: list[ir.Node] = []
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if bias is None or bias.size != n:
            return "Gemm bias is not a constant of N values"
    consumer = _sole_consumer(y)
    if bias is None and consumer is not None and consumer.op_type == "Add":
        other = consumer.inputs[1] if consumer.inputs[0] is y else consumer.inputs[0]
        b = const_array(other)
        if b is not None and b.size == n and b.shape[-1] == n:
            bias, y = b.reshape(n), consumer.outputs[0]
            folded.append(consumer)
            consumer = _sole_consumer(y)
    if consumer is not None and consumer.op_type == "BiasGelu" and bias is None:
        b = const_array(consumer.inputs[1])
        if b is not None and b.size == n and consumer.inputs[0] is y:
            bias, gelu, y = b.reshape(n), True, consumer.outputs[0]
            folded.append(consumer)
    elif consumer is not None and consumer.op_type == "Gelu":
        exact = consumer.attributes.get_string("approximate", "none") == "none"
        if exact:
            gelu, y = True, consumer.outputs[0]
            folded.append(consumer)
    residual = None
    consumer = _sole_consumer(y)
    if not gelu and consumer is not None and consumer.op_type == "Add":
        other = consumer.inputs[1] if consumer.inputs[0] is y else consumer.inputs[0]
        out = consumer.outputs[0]
        if (
            const_array(other) is None
            and other.dtype == ir.DataType.FLOAT
            and _same_shape(other, y)
            and _same_shape(out, y)
        ):
            residual, y = other, out
            folded.append(consumer)
    return bias, gelu, residual, y, tuple(folded)


def match_layer(node: ir.Node) -> _Match | str:
    """The lowering of one MatMul/Gemm, or the reason it cannot be lowered."""
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1"
        if attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with beta != 1"
    weight = _match_weight(node)
    if isinstance(weight, str):
        return weight
    x = _match_input(node)
    if isinstance(x, str):
        return x
    epilogue = _match_epilogue(node, weight[0].shape[0])
    if isinstance(epilogue, str):
        return epilogue
    bias, gelu, residual, output, folded = epilogue
    return _Match(node, *x, *weight, bias, gelu, residual, output, folded)


def block_sparsity(w: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of all-zero blocks of ``block`` = (rows, cols) in W [N, K], edges padded."""
    (n, k), (br, bc) = w.shape, block
    padded = np.zeros((-(-n // br) * br, -(-k // bc) * bc), dtype=bool)
    padded[:n, :k] = w != 0
    blocks = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    return 1.0 - float(blocks.any(axis=(1, 3)).mean())


def group_sparsity(w: np.ndarray) -> float:
    """Fraction of all-zero 1x4 groups (4 consecutive input features of one output channel):
    the work the VNNI and AVX2 kernels skip."""
    return block_sparsity(w, (1, 4))


def choose_block_shape(w: np.ndarray) -> tuple[int, int]:
    """The largest supported block shape that keeps (almost) all of the 1x4 sparsity: it is the
    structure the weight was pruned with (kernels re-lay weights out for themselves anyway, and
    larger blocks make a smaller blob)."""
    from fastonnx import _native

    fine = group_sparsity(w)
    best = (1, 4)
    for rows, cols in _native.supported_block_shapes():
        if rows * cols > best[0] * best[1] and block_sparsity(w, (rows, cols)) >= fine - 0.01:
            best = (rows, cols)
    return best


def _lower(graph: ir.Graph, m: _Match, name: str) -> LoweredLayer:
    from fastonnx import _native

    block = choose_block_shape(m.weight)
    blob = np.frombuffer(_native.pack_weight(m.weight, m.scale, block), dtype=np.uint8)
    packed = ir.Value(name=f"{name}/packed_weight", const_value=ir.tensor(blob))
    graph.register_initializer(packed)
    inputs: list[ir.Value | None] = [m.x, packed, None, m.x_scale, m.x_zero_point]
    if m.bias is not None:
        bias = ir.Value(name=f"{name}/bias", const_value=ir.tensor(m.bias.astype(np.float32)))
        graph.register_initializer(bias)
        inputs[2] = bias
    if m.residual is not None:
        inputs.append(m.residual)
    while inputs[-1] is None:
        inputs.pop()
    attrs = {"activation": "gelu"} if m.gelu else None
    op = ir.node("SparseLinear", inputs, attrs, domain=OP_DOMAIN, name=f"{name}/sparse")
    out = op.outputs[0]
    out.dtype = ir.DataType.FLOAT
    out.shape = m.output.shape
    graph.insert_after(m.folded[-1] if m.folded else m.matmul, op)
    out.name = f"{name}/out"
    replace_value(m.output, out)
    graph.remove([*reversed(m.folded), m.matmul], safe=True)
    return LoweredLayer(
        node=name,
        n=m.weight.shape[0],
        k=m.weight.shape[1],
        sparsity=group_sparsity(m.weight),
        block_shape=block,
        static_input=m.x_scale is not None,
        bias=m.bias is not None,
        gelu=m.gelu,
        residual=m.residual is not None,
        packed_bytes=blob.size,
    )


def _remove_dead_nodes(graph: ir.Graph) -> None:
    """Drops the Q/DQ nodes and weights the lowered layers no longer use."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not list(o.uses()) and not o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name, value in list(graph.initializers.items()):
        if not list(value.uses()) and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


# Paths whose dense kernels run at parity with ORT's int8 GEMM (MLAS uses the same VNNI / AMX
# instructions; `fastonnx bench kernels` at sparsity 0): there, every quantizable layer is
# lowered, since fastonnx's per-row activations are also the more accurate.
_PARITY_PATHS = ("avx512_vnni", "amx")
# Elsewhere (AVX2, the reference path) only layers sparse enough to win.
_SPARSE_ONLY_MIN_SPARSITY = 0.5


def auto_min_sparsity() -> float:
    """The default ``min_sparsity`` for this CPU (see _PARITY_PATHS)."""
    from fastonnx import _native

    path = _native.forced_isa() or _native.best_isa()
    return 0.0 if path in _PARITY_PATHS else _SPARSE_ONLY_MIN_SPARSITY


def lower_sparse(
    model: ir.Model, *, min_sparsity: float | None = None, dynamic_activations: bool = True
) -> SparseLoweringReport:
    """Lowers the model's quantized linear layers whose weight has at least ``min_sparsity`` of
    its 1x4 groups all zero to SparseLinear, in place (None: :func:`auto_min_sparsity`, 0 on
    CPUs with AVX-512 VNNI or AMX). Returns what was lowered and, for every other linear layer,
    why not.

    With ``dynamic_activations`` (the default) the ops quantize X per row at run time even where
    the QDQ model has a calibrated per-tensor scale: real encoders have activation outliers that
    one per-tensor scale serves badly (MiniLM-L6: cosine 0.9987 against fp32 per row, 0.989 per
    tensor). ``False`` keeps the QDQ model's quantization exactly."""
    if min_sparsity is None:
        min_sparsity = auto_min_sparsity()
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    report = SparseLoweringReport(min_sparsity=min_sparsity)
    graph = model.graph
    layers = [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]
    for i, node in enumerate(layers):
        name = node.name or f"linear_{i}"
        match = match_layer(node)
        if (
            dynamic_activations
            and not isinstance(match, str)
            and match.x.dtype != ir.DataType.UINT8
        ):
            match = dataclasses.replace(match, x_scale=None, x_zero_point=None)
        if isinstance(match, str):
            report.skipped.append(Skip(name, match))
            continue
        sparsity = group_sparsity(match.weight)
        if sparsity < min_sparsity:
            report.skipped.append(
                Skip(name, f"sparsity {sparsity:.0%} < {min_sparsity:.0%}: kept on ORT int8")
            )
            continue
        report.lowered.append(_lower(graph, match, name))
    if report.lowered:
        model.opset_imports[OP_DOMAIN] = 1
        _remove_dead_nodes(graph)
    return report


class LowerSparsePass(Pass):
    """:func:`lower_sparse` as a configured pass."""

    name = "lower_sparse"

    def __init__(self, min_sparsity: float | None = None, dynamic_activations: bool = True):
        super().__init__()
        self.min_sparsity, self.dynamic_activations = min_sparsity, dynamic_activations

    def run(self, model: ir.Model) -> SparseLoweringReport:
        return lower_sparse(
            model, min_sparsity=self.min_sparsity, dynamic_activations=self.dynamic_activations
        )
