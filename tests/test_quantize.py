"""Static INT8 QDQ quantization: micro-graphs (Q/DQ counts, scales, what stays float), the forms
ORT runs in int8 kernels, and accuracy against fp32 on random-weight encoders."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from encoders import Combo, encoder_inputs
from onnx import TensorProto, helper, numpy_helper

from fastonnx.model_io import ort_session
from fastonnx.passes.ort_int8_range import reduce_ort_int8_range
from fastonnx.passes.quantize_qdq import (
    QuantizeConfig,
    activation_qparams,
    calibrate,
    find_linear_layers,
    quantize_qdq,
    quantize_weight,
)
from fastonnx.verify import linear_kernels

D, HEADS, FFN = 32, 2, 64  # hidden size, heads, FFN size of the micro encoder layer
IR_VERSION = 10  # ORT 1.31 loads IR <= 13; onnx 1.23 writes 14 by default


def _model(nodes, inputs, outputs, initializers, opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def micro_encoder(seed: int = 0, static: bool = False) -> ir.Model:
    """One BERT layer, unfused, taking hidden states x [B, S, D]: 6 linear layers (Q, K, V,
    attention output, FFN in, FFN out), 2 LayerNorms, Softmax attention, erf GELU."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def linear(x, name, k, n):
        w = const(f"{name}.weight", rng.normal(0, 0.15, (k, n)).astype(np.float32))
        b = const(f"{name}.bias", rng.normal(0, 0.1, n).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}.mm"], name=f"{name}.MatMul"))
        nodes.append(helper.make_node("Add", [f"{name}.mm", b], [name], name=f"{name}.Add"))
        return name

    def layer_norm(x, name):
        g = const(f"{name}.gamma", (1 + rng.normal(0, 0.1, D)).astype(np.float32))
        b = const(f"{name}.beta", rng.normal(0, 0.1, D).astype(np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [name], axis=-1, name=name))
        return name

    def op(op_type, inputs, out, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    head = D // HEADS
    split = const("split_shape", np.array([0, 0, HEADS, head], np.int64))
    merge = const("merge_shape", np.array([0, 0, D], np.int64))
    ln1 = layer_norm("x", "ln1")
    q, k, v = (linear(ln1, name, D, D) for name in ("q", "k", "v"))
    qh = op("Transpose", [op("Reshape", [q, split], "q4")], "qh", perm=[0, 2, 1, 3])
    kh = op("Transpose", [op("Reshape", [k, split], "k4")], "kh", perm=[0, 2, 3, 1])
    vh = op("Transpose", [op("Reshape", [v, split], "v4")], "vh", perm=[0, 2, 1, 3])
    scale = const("attn_scale", np.array(1 / math.sqrt(head), np.float32))
    scores = op("Mul", [op("MatMul", [qh, kh], "qk"), scale], "scores")
    probs = op("Softmax", [scores], "probs", axis=-1)
    ctx = op("Transpose", [op("MatMul", [probs, vh], "ctx4")], "ctx_t", perm=[0, 2, 1, 3])
    ctx = op("Reshape", [ctx, merge], "ctx")
    h1 = op("Add", ["x", linear(ctx, "attn_out", D, D)], "h1")
    ln2 = layer_norm(h1, "ln2")
    f1 = linear(ln2, "ffn_in", D, FFN)
    erf = op("Erf", [op("Mul", [f1, const("inv_sqrt2", np.float32(1 / math.sqrt(2)))], "f1s")], "e")
    gelu = op(
        "Mul",
        [
            op("Mul", [f1, const("half", np.float32(0.5))], "f1h"),
            op("Add", [erf, const("one", np.float32(1.0))], "e1"),
        ],
        "gelu",
    )
    y = op("Add", [h1, linear(gelu, "ffn_out", FFN, D)], "y")
    shape = [2, 8, D] if static else ["B", "S", D]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, shape)],
        inits,
    )


def samples_for(model: ir.Model, n: int = 4, seed: int = 0, seq: int = 8):
    rng = np.random.default_rng(seed)
    x = model.graph.inputs[0]
    shape = [d if isinstance(d, int) else (2 if i == 0 else seq) for i, d in enumerate(x.shape)]
    return [{x.name: rng.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def run(model: ir.Model, samples) -> list[np.ndarray]:
    with ort_session(model) as session:
        return [session.run(None, s)[0] for s in samples]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def weights_by_name(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


# --------------------------------------------------------------------------------------------
# Quantization parameters


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "zero_point"),
    [
        (-1.0, 3.0, 4 / 255, 64),  # asymmetric: zero point round(1 / (4/255)) = 64
        (0.5, 2.0, 2 / 255, 0),  # range widened to include 0, so 0 is exact
        (-2.0, -1.0, 2 / 255, 255),
        (0.0, 0.0, 1.0, 0),  # constant zero tensor: any scale, keep it finite
    ],
)
def test_activation_qparams(lo, hi, scale, zero_point):
    s, zp = activation_qparams(lo, hi)
    assert s.dtype == np.float32 and zp.dtype == np.uint8
    assert s == pytest.approx(scale, rel=1e-6)
    assert int(zp) == zero_point


@pytest.mark.parametrize("reduce_range", [False, True])
def test_quantize_weight_per_channel(reduce_range):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (24, 5)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    w[0, 2] = 40.0  # an outlier only affects its own channel
    q, scale = quantize_weight(w, channel_axis=1, reduce_range=reduce_range)
    qmax = 63 if reduce_range else 127
    assert q.dtype == np.int8 and scale.shape == (5,)
    assert np.abs(q).max() <= qmax
    expected = np.where(np.abs(w).max(0) > 0, np.abs(w).max(0) / qmax, 1.0)
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert (q[:, 3] == 0).all()
    assert (np.abs(q * scale - w) <= scale / 2 + 1e-6).all()
    # Channel axis 0 (Gemm transB=1) quantizes rows.
    q_t, scale_t = quantize_weight(w.T, channel_axis=0, reduce_range=reduce_range)
    np.testing.assert_array_equal(q_t, q.T)
    np.testing.assert_array_equal(scale_t, scale)


# --------------------------------------------------------------------------------------------
# Micro-graphs: structure


def test_qdq_structure_on_micro_encoder():
    model = micro_encoder()
    before = ops(model)
    report = quantize_qdq(model, samples_for(model))
    after = ops(model)

    assert len(report.quantized) == 6
    # Q, K and V share one activation (LayerNorm's output): one Q for it, one DQ per consumer.
    assert after["QuantizeLinear"] == 4 == report.quantize_nodes
    assert after["DequantizeLinear"] == 12 == report.dequantize_nodes
    assert [s.reason for s in report.skipped] == [
        "no constant weight (activation x activation, e.g. attention)"
    ] * 2
    for op_type in ("LayerNormalization", "Softmax", "Erf", "Add", "MatMul"):
        assert after[op_type] == before[op_type], op_type
    for node in model.graph:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf", "Add", "Mul"):
            producers = [v.producer() for v in node.inputs if v is not None]
            assert all(p is None or p.op_type != "DequantizeLinear" for p in producers), node.name
        if node.op_type == "DequantizeLinear":
            assert [u.op_type for u, _ in node.outputs[0].uses()] == ["MatMul"]
        if node.op_type == "QuantizeLinear":
            assert node.outputs[0].dtype == ir.DataType.UINT8
            assert node.inputs[2].const_value.dtype == ir.DataType.UINT8
    # The float weights are gone; the int8 ones replace them.
    names = set(model.graph.initializers)
    assert "q.weight" not in names and "q.weight/int8" in names


def test_per_channel_weight_scales():
    model = micro_encoder(seed=3)
    float_weights = weights_by_name(model)
    quantize_qdq(model, samples_for(model))
    checked = 0
    for node in model.graph:
        if node.op_type != "MatMul" or node.inputs[1].producer() is None:
            continue
        dq = node.inputs[1].producer()
        if dq.op_type != "DequantizeLinear":
            continue
        values, scale, zero_point = (v.const_value.numpy() for v in dq.inputs)
        original = float_weights[dq.inputs[0].name.removesuffix("/int8")]
        assert dq.attributes.get_int("axis") == 1  # MatMul weights are [K, N]: N is axis 1
        assert values.dtype == np.int8 and values.shape == original.shape
        assert scale.shape == zero_point.shape == (original.shape[1],)
        assert zero_point.dtype == np.int8 and not zero_point.any()
        np.testing.assert_allclose(scale, np.abs(original).max(0) / 127, rtol=1e-6)
        assert (np.abs(values * scale - original) <= scale / 2 + 1e-6).all()
        checked += 1
    assert checked == 6


def test_activation_scale_from_calibrated_range():
    model = micro_encoder(seed=4)
    samples = samples_for(model, n=3)
    # The range of LayerNorm's output, measured independently of the pass.
    probe = micro_encoder(seed=4)
    probe.graph.outputs.append(next(n for n in probe.graph if n.name == "ln1").outputs[0])
    with ort_session(probe) as session:
        ln1 = np.stack([session.run(["ln1"], s)[0] for s in samples])
    report = quantize_qdq(model, samples)
    layer = next(q for q in report.quantized if q.node == "q.MatMul")
    lo, hi = min(float(ln1.min()), 0.0), max(float(ln1.max()), 0.0)
    assert layer.scale == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert layer.zero_point == round(-lo / ((hi - lo) / 255))


def test_percentile_clips_outliers():
    model = micro_encoder(seed=5)
    samples = samples_for(model, n=4)
    samples[0]["x"][0, 0, 0] = 1e4  # one outlier in the graph input
    layers, _ = find_linear_layers(model)
    minmax = calibrate(model, samples, ["x"])["x"]
    stats = calibrate(model, samples, ["x"], method="percentile")["x"]
    lo, hi = stats.clipped(99.9)
    assert minmax.hi == pytest.approx(1e4)
    assert minmax.lo <= lo < 0 < hi < 50 < minmax.hi
    # Calibration restores the graph's outputs.
    assert [v.name for v in model.graph.outputs] == ["y"] and len(layers) == 6


def test_gemm_transposed_weight_gets_axis_0_and_output_qdq():
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.2, (12, 16)).astype(np.float32)  # [N, K], transB=1
    # A Relu after the Gemm, so that the Gemm output is not a graph output.
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["fc_out"], transB=1, name="fc"),
            helper.make_node("Relu", ["fc_out"], ["out"], name="relu"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["M", 12])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(12, np.float32), "b")],
    )
    relu = next(n for n in model.graph if n.op_type == "Relu")
    samples = [{"x": rng.normal(0, 1, (3, 16)).astype(np.float32)} for _ in range(3)]
    expected = run(model, samples)
    report = quantize_qdq(model, samples)
    assert len(report.quantized) == 1 and report.quantized[0].output_quantized
    dq_w = next(
        n for n in model.graph if n.op_type == "DequantizeLinear" and n.name.startswith("w")
    )
    assert dq_w.attributes.get_int("axis") == 0
    np.testing.assert_allclose(dq_w.inputs[1].const_value.numpy(), np.abs(w).max(1) / 127, 1e-6)
    assert ops(model)["QuantizeLinear"] == 2  # the input and the output
    assert relu.inputs[0].producer().op_type == "DequantizeLinear"
    reduce_ort_int8_range(model)  # the int8 preset's next pass (7-bit weights where ORT needs)
    for want, got in zip(expected, run(model, samples), strict=True):
        assert cosine(want, got) > 0.999


def test_shared_weight_is_quantized_once():
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.2, (8, 8)).astype(np.float32)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="second"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    report = quantize_qdq(model, [{"x": rng.normal(0, 1, (1, 4, 8)).astype(np.float32)}])
    assert len(report.quantized) == 2
    int8 = [name for name in model.graph.initializers if name.endswith("/int8")]
    assert int8 == ["w/int8"] and "w" not in model.graph.initializers
    assert ops(model)["DequantizeLinear"] == 4  # one per consumer, for X and for W


def test_exclude_and_unchanged_models():
    model = micro_encoder()
    report = quantize_qdq(model, samples_for(model), QuantizeConfig(exclude={"ffn_out.MatMul"}))
    assert len(report.quantized) == 5
    assert ("ffn_out.MatMul", "excluded by the user") in {
        (s.node, s.reason) for s in report.skipped
    }

    # Already quantized: a second run changes nothing and says why.
    nodes = len(model.graph)
    again = quantize_qdq(model, samples_for(model))
    assert not again.quantized and len(model.graph) == nodes
    assert "already quantized" in again.notes[0]

    # Opset 12 has no per-channel DequantizeLinear.
    old = micro_encoder()
    old.opset_imports[""] = 12
    report = quantize_qdq(old, samples_for(old))
    assert not report.quantized and "opset 12" in report.notes[0]
    assert "QuantizeLinear" not in ops(old)


# --------------------------------------------------------------------------------------------
# What ORT makes of the QDQ forms


def _single_linear(rank: int, static: bool, bias: bool, seed: int = 8) -> ir.Model:
    rng = np.random.default_rng(seed)
    k, n = 32, 48
    dims = ([4] if rank == 2 else [2, 6])[: rank - 1]
    shape = [*dims, k] if static else [f"d{i}" for i in range(rank - 1)] + [k]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if bias else "y"], name="fc")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (k, n)).astype(np.float32), "w")]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="fc_bias"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.2, n).astype(np.float32), "b"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], n])],
        inits,
    )


@pytest.mark.parametrize(
    ("rank", "static", "bias"),
    [
        (3, False, True),  # the usual export: dynamic batch and sequence
        (3, True, True),  # static shapes: ORT would turn MatMul + Add into a float Gemm
        (2, False, True),  # 2-D + bias: only int8 as QGemm, with an output Q/DQ
        (2, True, False),
        (3, False, False),
    ],
)
def test_ort_runs_quantized_linear_in_int8(rank, static, bias):
    model = _single_linear(rank, static, bias)
    rng = np.random.default_rng(9)
    x = model.graph.inputs[0]
    shape = [d if isinstance(d, int) else 5 for d in x.shape]
    samples = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(3)]
    expected = run(model, samples)
    assert linear_kernels(model) == {"float": 1}  # the probe sees the float layer as float
    report = quantize_qdq(model, samples)
    assert len(report.quantized) == 1
    reduce_ort_int8_range(model)
    kernels = linear_kernels(model)
    assert kernels.get("int8") == 1, kernels
    assert "float on dequantized weights" not in kernels
    for want, got in zip(expected, run(model, samples), strict=True):
        assert cosine(want, got) > 0.999


@pytest.mark.parametrize("static", [False, True])
def test_micro_encoder_accuracy_and_int8_kernels(static):
    model = micro_encoder(seed=10, static=static)
    calibration = samples_for(model, n=8, seed=1)
    held_out = samples_for(model, n=4, seed=2)
    expected = run(model, held_out)
    quantize_qdq(model, calibration)
    reduce_ort_int8_range(model)
    kernels = linear_kernels(model)
    assert kernels.get("MatMulIntegerToFloat") == 6, kernels
    assert "float on dequantized weights" not in kernels
    for want, got in zip(expected, run(model, held_out), strict=True):
        assert cosine(want, got) >= 0.999


# --------------------------------------------------------------------------------------------
# Random-weight encoders exported from transformers


# One export per family, both exporters, and a legacy opset-14 export whose LayerNorm and GELU
# are decomposed (ReduceMean, Erf) before fusion.
ENCODERS = [
    Combo("bert", "sdpa", "dynamo"),
    Combo("distilbert", "eager", "legacy"),
    Combo("roberta", "sdpa", "dynamo"),
    Combo("bert", "eager", "legacy", opset=14),
]


@pytest.mark.parametrize("combo", ENCODERS, ids=str)
def test_encoder_accuracy_vs_fp32(encoder_exports, combo):
    from fastonnx.calibration import synthesize
    from fastonnx.model_io import load_model

    exported = encoder_exports.get(combo)
    reference = load_model(exported.path)
    model = load_model(exported.path)
    calibration = synthesize(model, num_samples=8, seq_len=16, seed=0, warn=False).samples
    report = quantize_qdq(model, calibration)
    assert len(report.quantized) == 6 * exported.num_layers  # Q, K, V, out, FFN in, FFN out
    assert linear_kernels(model).get("int8") == 6 * exported.num_layers
    with ort_session(reference) as ref, ort_session(model) as quant:
        for seed in range(3):  # held-out inputs with real padding
            sample = encoder_inputs(exported.input_names, exported.pad_token_id, seed=seed)
            want, got = ref.run(None, sample)[0], quant.run(None, sample)[0]
            assert cosine(want, got) >= 0.99
