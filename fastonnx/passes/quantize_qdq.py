"""Static INT8 quantization of linear layers, in standard ONNX QDQ form.

Glossary: a *linear layer* is a MatMul or Gemm whose second input is a constant 2-D float weight.
K is its input features, N its output features (channels). MatMul weights are [K, N]; Gemm
weights are [K, N] (transB=0) or [N, K] (transB=1). X is the activation input, Y the output.

What is emitted, per layer::

    X ─QuantizeLinear(u8, per-tensor)─DequantizeLinear─┐
    W_s8 ─────────DequantizeLinear(axis = N's axis)────MatMul ─ Y (float)

Activations are uint8 asymmetric per tensor (ranges calibrated by running the float model in ORT);
weights int8 symmetric per output channel, zero points 0, range [-127, 127] (or [-63, 63] with
``reduce_range`` for CPUs without VNNI, where u8 x s8 pairs can saturate int16). Everything
else (LayerNorm, Softmax, attention, residual adds, GELU) stays float.

Which forms ORT 1.31 runs in int8 kernels on the CPU (read from ``optimized_model_filepath``):

* MatMul with QDQ inputs and a float output -> QuantizeLinear + ``MatMulIntegerToFloat``
  (com.microsoft), per-channel weight scales included. This is the form used.
* Gemm, or a 2-D MatMul followed by a bias Add (which ORT's MatMulAddFusion turns into a Gemm),
  only becomes int8 (``QGemm``) when its output is quantized too; without an output Q it runs as a
  float Gemm on dequantized weights. Those layers therefore also get an output Q/DQ pair.
* A 3-D MatMul + bias Add with fully static shapes is also turned into a Gemm (with Reshapes) by
  MatMulAddFusion; giving the bias the MatMul output's rank ([1, 1, N]) keeps it a MatMul, hence
  MatMulIntegerToFloat. With dynamic batch or sequence axes the fusion does not fire.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from fastonnx.passes.base import Pass, Report, Skip

Method = Literal["minmax", "percentile"]

# Ops whose presence means the model is already quantized; quantizing again would stack Q/DQ.
_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QGemm",
    "DynamicQuantizeMatMul",
}
_MIN_OPSET = 13  # DequantizeLinear's per-channel ``axis`` appeared in opset 13
_HIST_BINS = 2048


# --------------------------------------------------------------------------------------------
# Configuration and report


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize.

    method: "minmax" uses the observed range; "percentile" clips each activation range to the
        ``percentile`` (and 100 - ``percentile``) of observed values (needs a second calibration
        pass), which helps when a few outliers stretch the range.
    reduce_range: 7-bit weights, for CPUs without VNNI (AVX2 / AVX-512F u8 x s8 saturates).
    exclude: names of nodes to keep in float.
    """

    method: Method = "minmax"
    percentile: float = 99.999
    reduce_range: bool = False
    exclude: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "percentile"):
            raise ValueError(f"unknown calibration method {self.method!r} (minmax, percentile)")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class QuantizedLayer:
    node: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    activation: str
    scale: float  # activation scale
    zero_point: int  # activation zero point
    output_quantized: bool  # an output Q/DQ pair was added (Gemm-like layers, see module doc)


@dataclass(kw_only=True)
class QuantizeReport(Report):
    """Layers quantized; ``skipped``: linear layers left float, with the reason."""

    quantized: list[QuantizedLayer] = field(default_factory=list)
    method: str = "minmax"
    num_samples: int = 0
    quantize_nodes: int = 0
    dequantize_nodes: int = 0

    @property
    def counts(self) -> dict[str, int]:
        return {
            "linear layers quantized": len(self.quantized),
            "QuantizeLinear": self.quantize_nodes,
            "DequantizeLinear": self.dequantize_nodes,
        }


# --------------------------------------------------------------------------------------------
# Finding linear layers


@dataclass(frozen=True)
class LinearLayer:
    """A quantizable layer: its node, weight, the weight's output-channel axis, and bias Add."""

    node: ir.Node
    activation: ir.Value
    weight: ir.Value
    channel_axis: int
    bias_add: ir.Node | None  # MatMul's only consumer when it adds a constant [N] bias

    @property
    def output(self) -> ir.Value:
        """The value an output Q/DQ pair would quantize (after the bias, when there is one)."""
        return (self.bias_add or self.node).outputs[0]


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    return None if value is None else ir.convenience.get_const_tensor(value)


def _bias_add(node: ir.Node, n_out: int) -> ir.Node | None:
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or node.outputs[0].is_graph_output():
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain != "":
        return None
    bias = _const(add.inputs[1 - index])
    if bias is None or bias.dtype != ir.DataType.FLOAT or math.prod(bias.shape) != n_out:
        return None
    if any(d != 1 for d in list(bias.shape)[:-1]):
        return None
    return add


def _classify(node: ir.Node, exclude: frozenset[str]) -> LinearLayer | str:
    """A LinearLayer, or the reason this MatMul/Gemm is not one."""
    if node.name in exclude:
        return "excluded by the user"
    x, w = node.inputs[0], node.inputs[1]
    weight = _const(w)
    if weight is None:
        if _const(x) is not None:
            return "constant weight is the first input (W @ X); only X @ W is handled"
        return "no constant weight (activation x activation, e.g. attention)"
    if _const(x) is not None:
        return "both inputs are constants"
    if weight.dtype != ir.DataType.FLOAT:
        return f"weight is {weight.dtype.name}; only float32 weights are quantized"
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return f"activation is {x.dtype.name}; only float32 activations are quantized"
    if len(weight.shape) != 2:
        return f"weight is not 2-D (shape {list(weight.shape)})"
    channel_axis = 1
    bias_add = None
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return "Gemm with transA=1"
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return "Gemm with alpha or beta != 1"
        channel_axis = 0 if attrs.get_int("transB", 0) else 1
    else:
        bias_add = _bias_add(node, weight.shape[1])
    return LinearLayer(node, x, w, channel_axis, bias_add)


def find_linear_layers(
    model: ir.Model, exclude: Iterable[str] = ()
) -> tuple[list[LinearLayer], list[Skip]]:
    """The model's quantizable linear layers in graph order, and the MatMul/Gemm nodes skipped."""
    layers, skipped = [], []
    exclude = frozenset(exclude)
    for node in model.graph:
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
            continue
        found = _classify(node, exclude)
        if isinstance(found, str):
            skipped.append(Skip(node.name or "", found, node.op_type))
        else:
            layers.append(found)
    return layers, skipped


# --------------------------------------------------------------------------------------------
# Calibration


@dataclass
class TensorStats:
    """Observed range of one tensor over the calibration samples, and its rank."""

    lo: float
    hi: float
    rank: int
    histogram: np.ndarray | None = None  # counts over [lo, hi], percentile method only

    def clipped(self, percentile: float) -> tuple[float, float]:
        """(low, high) at the given percentile, from the histogram."""
        if self.histogram is None or self.histogram.sum() == 0:
            return self.lo, self.hi
        cdf = np.cumsum(self.histogram) / self.histogram.sum()
        edges = np.linspace(self.lo, self.hi, len(self.histogram) + 1)
        tail = 1.0 - percentile / 100.0
        low = edges[int(np.searchsorted(cdf, tail, side="right"))]
        high = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, len(edges) - 1)]
        return float(low), float(high)


class CalibrationRunError(RuntimeError):
    """ORT could not run the float model on the calibration samples."""


def calibrate(
    model: ir.Model,
    samples: Sequence[Mapping[str, np.ndarray]],
    names: Iterable[str],
    *,
    method: Method = "minmax",
) -> dict[str, TensorStats]:
    """Run the float model in ORT on ``samples``; return the range of each named tensor.

    The tensors are added as graph outputs for the run and removed again. ``percentile`` needs
    a second pass, histogramming each tensor over the range found by the first.
    """
    import onnxruntime as ort

    from fastonnx.model_io import ort_session

    if not samples:
        raise ValueError("calibration needs at least one sample")
    graph = model.graph
    wanted = list(dict.fromkeys(names))
    by_name = {v.name: v for v in graph.inputs}
    by_name.update({v.name: v for node in graph for v in node.outputs})
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise KeyError(f"no tensors named {missing} in the graph")
    fetch = [n for n in wanted if not by_name[n].is_graph_input()]
    added = [by_name[n] for n in fetch if not by_name[n].is_graph_output()]

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    graph.outputs.extend(added)
    try:
        with ort_session(model, so) as session:

            def run(sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                try:
                    # run([]) would mean "all outputs": only run when something is fetched.
                    outputs = session.run(fetch, dict(sample)) if fetch else []
                except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                    raise CalibrationRunError(
                        f"ORT failed on a calibration sample: {str(exc).strip().splitlines()[0]}"
                    ) from exc
                arrays = dict(zip(fetch, outputs, strict=True))
                arrays.update({n: np.asarray(sample[n]) for n in wanted if n not in arrays})
                return arrays

            stats: dict[str, TensorStats] = {}
            for sample in samples:
                for name, array in run(sample).items():
                    lo, hi = (float(array.min()), float(array.max())) if array.size else (0, 0)
                    if name in stats:
                        s = stats[name]
                        s.lo, s.hi = min(s.lo, lo), max(s.hi, hi)
                    else:
                        stats[name] = TensorStats(lo, hi, array.ndim)
            if method == "percentile":
                for s in stats.values():
                    s.histogram = np.zeros(_HIST_BINS, dtype=np.int64)
                for sample in samples:
                    for name, array in run(sample).items():
                        s = stats[name]
                        if math.isfinite(s.lo) and math.isfinite(s.hi) and s.hi > s.lo:
                            counts, _ = np.histogram(array, bins=_HIST_BINS, range=(s.lo, s.hi))
                            s.histogram += counts
    finally:
        for _ in added:
            graph.outputs.pop()
    return stats


# --------------------------------------------------------------------------------------------
# Quantization parameters


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric (scale, zero point) covering [lo, hi] and 0 (so 0 is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0.0:
        return np.float32(1.0), np.uint8(0)
    scale = np.float32((hi - lo) / 255.0)
    zero_point = int(np.clip(np.rint(-lo / float(scale)), 0, 255))
    return scale, np.uint8(zero_point)


def quantize_weight(
    weight: np.ndarray, channel_axis: int, *, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric per-channel (values, scales) for ``weight`` along ``channel_axis``."""
    qmax = 63 if reduce_range else 127
    weight = np.asarray(weight, dtype=np.float32)
    reduce_axes = tuple(a for a in range(weight.ndim) if a != channel_axis)
    amax = np.abs(weight).max(axis=reduce_axes)
    # An all-zero channel gets scale 1: any scale reproduces it exactly.
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[channel_axis] = -1
    values = np.clip(np.rint(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return values, scale


# --------------------------------------------------------------------------------------------
# Rewriting


class _Rewriter:
    """Inserts Q/DQ nodes into one graph; keeps generated names unique and shares Q nodes."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.names = {v.name for v in graph.inputs} | set(graph.initializers)
        self.names |= {v.name for node in graph for v in node.outputs}
        self.quantized: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}  # X -> (Xq, s, zp)
        self.weights: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.q_nodes = 0
        self.dq_nodes = 0

    def unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        name = self.unique(name)
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def quantize(self, x: ir.Value, scale: np.float32, zero_point: np.uint8) -> ir.Value:
        """X's uint8 value, made once per tensor right after X's producer."""
        if x.name in self.quantized:
            return self.quantized[x.name][0]
        s = self.initializer(f"{x.name}/scale", np.array(scale, dtype=np.float32))
        zp = self.initializer(f"{x.name}/zero_point", np.array(zero_point, dtype=np.uint8))
        xq = ir.Value(name=self.unique(f"{x.name}/quantized"), shape=x.shape)
        xq.dtype = ir.DataType.UINT8
        node = ir.node("QuantizeLinear", [x, s, zp], outputs=[xq], name=xq.name)
        producer = x.producer()
        if producer is None:  # a graph input
            self.graph.insert_before(next(iter(self.graph)), node)
        else:
            self.graph.insert_after(producer, node)
        self.q_nodes += 1
        self.quantized[x.name] = (xq, s, zp)
        return xq

    def dequantize(
        self, xq: ir.Value, s: ir.Value, zp: ir.Value, name: str, axis: int | None = None
    ) -> tuple[ir.Node, ir.Value]:
        out = ir.Value(name=self.unique(name), shape=xq.shape)
        out.dtype = ir.DataType.FLOAT
        attrs = {"axis": axis} if axis is not None else None
        node = ir.node("DequantizeLinear", [xq, s, zp], attrs, outputs=[out], name=out.name)
        self.dq_nodes += 1
        return node, out

    def quantized_weight(self, layer: LinearLayer, reduce_range: bool):
        key = (id(layer.weight), layer.channel_axis)
        if key not in self.weights:
            values, scale = quantize_weight(
                _const(layer.weight).numpy(), layer.channel_axis, reduce_range=reduce_range
            )
            name = layer.weight.name
            self.weights[key] = (
                self.initializer(f"{name}/int8", values),
                self.initializer(f"{name}/scale", scale),
                self.initializer(f"{name}/zero_point", np.zeros(scale.shape, dtype=np.int8)),
            )
        return self.weights[key]

    def remove_if_unused(self, value: ir.Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant":
            self.graph.remove(producer, safe=True)
        elif value.is_initializer() and not value.is_graph_input():
            self.graph.initializers.pop(value.name)


def _layer_problem(layer: LinearLayer, stats: Mapping[str, TensorStats]) -> str | None:
    x_stats = stats.get(layer.activation.name)
    needed = [layer.activation.name]
    if x_stats is not None and _needs_output_qdq(layer, x_stats.rank):
        needed.append(layer.output.name)
    for name in needed:
        s = stats.get(name)
        if s is None:
            return f"no calibration range for '{name}'"
        if not (math.isfinite(s.lo) and math.isfinite(s.hi)):
            return f"calibration saw non-finite values in '{name}'"
    return None


def _needs_output_qdq(layer: LinearLayer, rank: int) -> bool:
    # See the module docstring: ORT fuses Gemm (and 2-D MatMul + bias, which it turns into Gemm)
    # into int8 QGemm only when the output is quantized as well.
    return layer.node.op_type == "Gemm" or (layer.bias_add is not None and rank == 2)


def _static_inputs(graph: ir.Graph) -> bool:
    return all(
        v.shape is not None and all(isinstance(d, int) for d in v.shape) for v in graph.inputs
    )


def insert_qdq(
    model: ir.Model,
    layers: Sequence[LinearLayer],
    stats: Mapping[str, TensorStats],
    config: QuantizeConfig = QuantizeConfig(),  # noqa: B008 - frozen, safe as a default
) -> QuantizeReport:
    """Rewrite ``layers`` (from :func:`find_linear_layers`) in place with calibrated ``stats``."""
    graph = model.graph
    report = QuantizeReport(method=config.method)
    rw = _Rewriter(graph)
    static = _static_inputs(graph)

    def qparams(name: str) -> tuple[np.float32, np.uint8]:
        s = stats[name]
        lo, hi = s.clipped(config.percentile) if config.method == "percentile" else (s.lo, s.hi)
        return activation_qparams(lo, hi)

    for layer in layers:
        node = layer.node
        problem = _layer_problem(layer, stats)
        if problem is not None:
            report.skipped.append(Skip(node.name or "", problem, node.op_type))
            continue
        x, w = layer.activation, layer.weight
        rank = stats[x.name].rank
        scale, zero_point = qparams(x.name)

        # Input side: X -> Q -> DQ and W_s8 -> DQ(axis), both feeding the layer.
        xq = rw.quantize(x, scale, zero_point)
        _, s, zp = rw.quantized[x.name]
        x_dq_node, x_dq = rw.dequantize(xq, s, zp, f"{x.name}/dequantized")
        wq, ws, wzp = rw.quantized_weight(layer, config.reduce_range)
        w_dq_node, w_dq = rw.dequantize(wq, ws, wzp, f"{w.name}/dequantized", layer.channel_axis)
        graph.insert_before(node, [x_dq_node, w_dq_node])
        node.replace_input_with(0, x_dq)
        node.replace_input_with(1, w_dq)
        rw.remove_if_unused(w)

        output_qdq = _needs_output_qdq(layer, rank)
        if output_qdq:
            _quantize_output(rw, layer.output, *qparams(layer.output.name))
        elif layer.bias_add is not None and rank > 2 and static:
            _broadcast_bias(rw, layer.bias_add, node.outputs[0], rank)
        report.quantized.append(
            QuantizedLayer(
                node=node.name or "",
                op_type=node.op_type,
                weight=w.name or "",
                weight_shape=tuple(_const(wq).shape),
                activation=x.name or "",
                scale=float(scale),
                zero_point=int(zero_point),
                output_quantized=output_qdq,
            )
        )
    report.quantize_nodes, report.dequantize_nodes = rw.q_nodes, rw.dq_nodes
    return report


def _quantize_output(rw: _Rewriter, y: ir.Value, scale: np.float32, zero_point: np.uint8) -> None:
    """Route Y's float consumers through Q -> DQ (sharing Y's Q if it already has one).

    ORT fuses the layer only when Q is Y's sole consumer, so a graph output Y is handed over to
    the DQ output, which takes Y's name (the model's interface does not change).
    """
    float_uses = [(n, i) for n, i in y.uses() if n.op_type != "QuantizeLinear"]
    yq = rw.quantize(y, scale, zero_point)
    _, s, zp = rw.quantized[y.name]
    outputs = rw.graph.outputs
    slots = [i for i, v in enumerate(outputs) if v is y]
    if not float_uses and not slots:
        return
    dq_node, y_dq = rw.dequantize(yq, s, zp, f"{y.name}/dequantized")
    rw.graph.insert_after(yq.producer(), dq_node)
    for consumer, index in float_uses:
        consumer.replace_input_with(index, y_dq)
    if slots:
        name = y.name
        y.name = rw.unique(f"{name}/float")
        y_dq.name = name
        y_dq.shape = y.shape
        for i in slots:
            outputs[i] = y_dq


def _broadcast_bias(rw: _Rewriter, add: ir.Node, matmul_out: ir.Value, rank: int) -> None:
    """Give the bias the MatMul output's rank so ORT keeps MatMul (int8) instead of a Gemm."""
    index = 1 if add.inputs[0] is matmul_out else 0
    bias = add.inputs[index]
    array = _const(bias).numpy()
    if array.ndim == rank:
        return
    new = rw.initializer(f"{bias.name}/broadcast", array.reshape([1] * (rank - 1) + [-1]))
    add.replace_input_with(index, new)
    rw.remove_if_unused(bias)


# --------------------------------------------------------------------------------------------
# The pass


def quantize_qdq(
    model: ir.Model,
    samples: Sequence[Mapping[str, np.ndarray]],
    config: QuantizeConfig | None = None,
) -> QuantizeReport:
    """Calibrate on ``samples`` and quantize the model's linear layers in place (QDQ form).

    Returns what was quantized and what was skipped, with reasons. A model that is already
    quantized, or whose opset predates per-channel DequantizeLinear, is left unchanged.
    """
    config = config or QuantizeConfig()
    report = QuantizeReport(method=config.method, num_samples=len(samples))
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    already = sorted({n.op_type for n in model.graph if n.op_type in _QUANTIZED_OPS})
    if already:
        report.notes.append(f"model is already quantized ({', '.join(already)}); left unchanged")
        return report
    if opset < _MIN_OPSET:
        report.notes.append(
            f"ai.onnx opset {opset} < {_MIN_OPSET} has no per-channel DequantizeLinear; "
            "re-export with a newer opset to quantize"
        )
        return report
    layers, skipped = find_linear_layers(model, config.exclude)
    report.skipped.extend(skipped)
    if not layers:
        return report
    names = [layer.activation.name for layer in layers]
    names += [layer.output.name for layer in layers if _may_need_output_qdq(layer)]
    stats = calibrate(model, samples, names, method=config.method)
    result = insert_qdq(model, layers, stats, config)
    result.skipped[:0] = report.skipped
    result.num_samples = len(samples)
    return result


def _may_need_output_qdq(layer: LinearLayer) -> bool:
    """Whether to calibrate the layer's output too: :func:`_needs_output_qdq` decides once the
    activation's rank is known, which calibration tells when the graph does not."""
    shape = layer.activation.shape
    rank = shape.rank() if shape is not None else None
    return layer.node.op_type == "Gemm" or (layer.bias_add is not None and rank in (None, 2))


class QuantizePass(Pass):
    """:func:`quantize_qdq` as a configured pass (calibration samples given when made)."""

    name = "quantize"

    def __init__(
        self, samples: Sequence[Mapping[str, np.ndarray]], config: QuantizeConfig | None = None
    ):
        super().__init__()
        self.samples, self.config = samples, config

    def run(self, model: ir.Model) -> QuantizeReport:
        return quantize_qdq(model, self.samples, self.config)
