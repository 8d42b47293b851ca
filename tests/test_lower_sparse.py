"""Sparse lowering on hand-built QDQ graphs: what is lowered, what is kept and why, and that
the lowered model (with fastonnx's library) matches the QDQ model in vanilla ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.kernel_reference import block_sparse_weight

_native = pytest.importorskip("fastonnx._native")
ort = pytest.importorskip("onnxruntime")

import fastonnx  # noqa: E402
from fastonnx.passes.lower_sparse import group_sparsity, lower_sparse  # noqa: E402
from fastonnx.passes.ort_int8_range import reduce_ort_int8_range  # noqa: E402

D, F = 64, 96  # hidden size, feed-forward size


def qdq_mlp(
    sparsities=(0.9, 0.9), *, block=(1, 4), gelu="Gelu", static=True, residual=False, seed=0
):
    """X[B,S,D] -Q/DQ- MatMul(W1) + b1 -> GELU -Q/DQ- MatMul(W2) + b2 -> Y, weights DQ per
    channel. gelu: "Gelu" (ONNX), "BiasGelu" (com.microsoft, bias folded in) or None."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(x, name, scale, zp):
        s, z = const(f"{name}_s", np.float32(scale)), const(f"{name}_zp", np.uint8(zp))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"]))
        return f"{name}_dq"

    def linear(x, name, k, n, sparsity):
        w = block_sparse_weight(n, k, sparsity, block, rng)  # [N, K]
        scale = (rng.random(n) * 0.01 + 0.005).astype(np.float32)
        wq = const(f"{name}_wq", np.ascontiguousarray(w.T))  # MatMul wants [K, N]
        ws = const(f"{name}_ws", scale)
        nodes.append(helper.make_node("DequantizeLinear", [wq, ws], [f"{name}_w"], axis=1))
        nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_mm"], name=name))
        return f"{name}_mm", rng.standard_normal(n).astype(np.float32) * 0.1

    x = qdq("X", "x", 0.03, 128) if static else "X"
    h, b1 = linear(x, "fc1", D, F, sparsities[0])
    if gelu == "BiasGelu":
        nodes.append(
            helper.make_node("BiasGelu", [h, const("b1", b1)], ["h"], domain="com.microsoft")
        )
    else:
        nodes.append(helper.make_node("Add", [h, const("b1", b1)], ["h_b"]))
        if gelu == "Gelu":
            nodes.append(helper.make_node("Gelu", ["h_b"], ["h"]))
        else:
            nodes.append(helper.make_node("Identity", ["h_b"], ["h"]))
    h = qdq("h", "h", 0.02, 10) if static else "h"
    y, b2 = linear(h, "fc2", F, D, sparsities[1])
    if residual:  # Y = fc2(...) + b2 + X, as an encoder's residual connection
        nodes.append(helper.make_node("Add", [y, const("b2", b2)], ["y_b"]))
        nodes.append(helper.make_node("Add", ["y_b", "X"], ["Y"]))
    else:
        nodes.append(helper.make_node("Add", [y, const("b2", b2)], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", D])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", D])],
        inits,
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def run_plain(model: onnx.ModelProto, x):
    """The QDQ model's math as written: with graph optimizations off, ORT runs each
    DequantizeLinear and a float MatMul, so its int8 GEMM (which saturates on CPUs without
    VNNI) is not the reference."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"X": x})[0]


def run_fast(model: onnx.ModelProto, x):
    return fastonnx.make_session(model.SerializeToString()).run(None, {"X": x})[0]


def lower(model: onnx.ModelProto, **kw):
    ir_model = ir.serde.deserialize_model(model)
    report = lower_sparse(ir_model, **kw)
    return ir.serde.serialize_model(ir_model), report


@pytest.mark.parametrize("gelu", ["Gelu", "BiasGelu", None])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_lowered_model_matches_qdq_model(gelu, static):
    model = qdq_mlp(gelu=gelu, static=static)
    lowered, report = lower(model, dynamic_activations=False)
    assert [layer.node for layer in report.lowered] == ["fc1", "fc2"]
    assert all(layer.static_input == static for layer in report.lowered)
    assert report.lowered[0].gelu == (gelu is not None)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count("SparseLinear") == 2 and "MatMul" not in ops
    assert "DequantizeLinear" not in ops  # weight and activation Q/DQ folded away
    assert [o.name for o in lowered.graph.output] == ["Y"]
    x = np.random.default_rng(1).standard_normal((2, 7, D)).astype(np.float32)
    expected, got = run_plain(model, x), run_fast(lowered, x)
    if static:
        # Same quantization; only float rounding (and ORT's int8 kernel choice) differ.
        assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max() + 1e-4
    else:
        # The QDQ-free model multiplies float activations; the op quantizes them per row.
        assert cosine(got, expected) >= 0.999
        assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def cosine(a, b) -> float:
    return float(np.dot(a.ravel(), b.ravel())) / float(np.linalg.norm(a) * np.linalg.norm(b))


def test_dynamic_activations_track_float_activations_better():
    """Per-row run-time quantization is closer to the float-activation model (same int8
    weights, no activation Q/DQ) than the calibrated per-tensor scale is."""
    model = qdq_mlp()
    dynamic, report = lower(model, dynamic_activations=True)
    static, _ = lower(model, dynamic_activations=False)
    assert [layer.static_input for layer in report.lowered] == [False, False]
    assert "QuantizeLinear" not in [n.op_type for n in dynamic.graph.node]
    x = np.random.default_rng(4).standard_normal((2, 9, D)).astype(np.float32)
    float_acts = run_plain(qdq_mlp(static=False), x)
    assert cosine(run_fast(dynamic, x), float_acts) >= 0.999
    assert cosine(run_fast(dynamic, x), float_acts) > cosine(run_fast(static, x), float_acts)


def test_residual_add_folds_into_the_op():
    model = qdq_mlp(residual=True)
    lowered, report = lower(model, dynamic_activations=False)
    assert [layer.residual for layer in report.lowered] == [False, True]
    assert [n.op_type for n in lowered.graph.node].count("Add") == 0
    assert [o.name for o in lowered.graph.output] == ["Y"]
    x = np.random.default_rng(5).standard_normal((2, 7, D)).astype(np.float32)
    expected = run_plain(model, x)
    assert np.abs(run_fast(lowered, x) - expected).max() <= 1e-3 * np.abs(expected).max() + 1e-4


def test_residual_of_unknown_shape_is_left_as_an_add():
    model = qdq_mlp(residual=True)
    del model.graph.value_info[:]  # no shapes: broadcasting cannot be ruled out
    lowered, report = lower(model, dynamic_activations=False)
    assert [layer.residual for layer in report.lowered] == [False, False]
    assert [n.op_type for n in lowered.graph.node].count("Add") == 1


def test_dense_layers_stay_on_ort_with_reason():
    # fc2 stays on ORT's int8 GEMM: with the 7-bit weights it gets where that saturates (the
    # ort_int8_range pass), in the reference as well.
    ir_model = ir.serde.deserialize_model(qdq_mlp(sparsities=(0.9, 0.2)))
    reduce_ort_int8_range(ir_model)
    model = ir.serde.serialize_model(ir_model)
    lowered, report = lower(model, min_sparsity=0.5, dynamic_activations=False)
    assert [layer.node for layer in report.lowered] == ["fc1"]
    assert report.skipped[0].node == "fc2"
    assert "sparsity 20% < 50%" in report.skipped[0].reason
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count("SparseLinear") == 1 and ops.count("MatMul") == 1
    x = np.random.default_rng(2).standard_normal((1, 5, D)).astype(np.float32)
    expected = run_plain(model, x)
    assert np.abs(run_fast(lowered, x) - expected).max() <= 1e-3 * np.abs(expected).max() + 1e-4


def test_block_shape_follows_the_pruning_structure():
    _, report = lower(qdq_mlp(block=(16, 4)))
    assert {layer.block_shape for layer in report.lowered} == {(16, 4)}
    _, report = lower(qdq_mlp(block=(1, 4)))
    assert {layer.block_shape for layer in report.lowered} == {(1, 4)}
    assert report.lowered[0].sparsity == pytest.approx(0.9, abs=0.01)


def test_float_model_is_left_unchanged_and_reported():
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, D])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lowered, report = lower(model)
    assert not report.lowered
    assert "DequantizeLinear" in report.skipped[0].reason
    assert [n.op_type for n in lowered.graph.node] == ["MatMul"]


def test_bad_min_sparsity():
    with pytest.raises(ValueError, match="min_sparsity"):
        lower(qdq_mlp(), min_sparsity=1.5)


def test_group_sparsity():
    w = np.zeros((2, 8), np.int8)
    w[0, 5] = 1
    assert group_sparsity(w) == 0.75
