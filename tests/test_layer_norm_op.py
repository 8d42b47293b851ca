"""com.fastonnx::LayerNorm (LayerNorm + per-row uint8 quantization) and SparseLinear reading its
uint8 output: the kernel on every path against NumPy, the ops inside ORT, bad input, and the
lower_layer_norm pass on whole encoders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from encoders import Combo, encoder_inputs
from onnx import TensorProto, helper, numpy_helper

from tests.kernel_reference import block_sparse_weight, quantize_rows

_native = pytest.importorskip("fastonnx._native")
ort = pytest.importorskip("onnxruntime")

import fastonnx  # noqa: E402
from fastonnx import optimizer  # noqa: E402
from fastonnx.passes.lower_layer_norm import lower_layer_norm  # noqa: E402

OP_DOMAIN = "com.fastonnx"
PATHS = _native.all_isas()


def reference(x, gamma, beta, eps):
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps) * gamma + (0 if beta is None else beta)
    return y.astype(np.float32)


def need(isa):
    why = _native.isa_unavailable_reason(isa)
    if why:
        pytest.skip(f"{isa} cannot run on this CPU: {why}")


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("rows, d", [(1, 1), (3, 7), (17, 16), (5, 33), (130, 384), (2, 385)])
@pytest.mark.parametrize("with_beta", [True, False])
def test_kernel_matches_numpy(isa, rows, d, with_beta):
    need(isa)
    rng = np.random.default_rng(rows * 1000 + d)
    x = (rng.standard_normal((rows, d)) * 3 + 1).astype(np.float32)
    gamma = rng.standard_normal(d).astype(np.float32)
    beta = rng.standard_normal(d).astype(np.float32) if with_beta else None
    y, yq, scale, zp = _native.layer_norm(x, gamma, beta, 1e-5, isa)
    np.testing.assert_allclose(y, reference(x, gamma, beta, 1e-5), rtol=1e-4, atol=2e-5)
    # The quantization is exactly SparseLinear's dynamic per-row rule applied to y.
    q, s, z = quantize_rows(y)
    np.testing.assert_array_equal(scale, s[:, 0])
    np.testing.assert_array_equal(zp, z[:, 0].astype(np.uint8))
    np.testing.assert_array_equal(yq, q)


@pytest.mark.parametrize("isa", PATHS)
def test_kernel_leading_dims_and_threads(isa):
    need(isa)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 37, 48)).astype(np.float32)
    gamma, beta = np.ones(48, np.float32), np.zeros(48, np.float32)
    one = _native.layer_norm(x, gamma, beta, 1e-12, isa)
    two = _native.layer_norm(x, gamma, beta, 1e-12, isa, threads=2)
    assert one[0].shape == (3, 37, 48) and one[2].shape == (3, 37) and one[3].dtype == np.uint8
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("isa", PATHS)
def test_kernel_non_finite_rows(isa):
    """A NaN/inf row, and a finite row whose output overflows, give NaN y, 0 yq, scale NaN and
    zero point 0; the other rows are unaffected."""
    need(isa)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    x[1, 3], x[2, 39], x[3, 0] = np.nan, np.inf, -np.inf
    gamma = np.ones(40, np.float32)
    y, yq, scale, zp = _native.layer_norm(x, gamma, None, 1e-5, isa)
    for r in (1, 2, 3):
        assert np.isnan(y[r]).all() and np.isnan(scale[r]) and zp[r] == 0 and not yq[r].any()
    good = [0, 4, 5]
    np.testing.assert_allclose(y[good], reference(x[good], gamma, None, 1e-5), rtol=1e-4, atol=2e-5)
    huge = np.full(40, 3e38, np.float32)
    y, _, scale, _ = _native.layer_norm(x[[0]], huge, None, 1e-5, isa)
    assert np.isnan(y).all() and np.isnan(scale[0])


def test_kernel_bad_input():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="epsilon"):
        _native.layer_norm(x, np.ones(8, np.float32), None, -1.0)
    with pytest.raises(ValueError, match="gamma"):
        _native.layer_norm(x, np.ones(7, np.float32), None, 1e-5)
    with pytest.raises(ValueError, match="at least one element"):
        _native.layer_norm(np.ones((2, 0), np.float32), np.ones(0, np.float32), None, 1e-5)


# ------------------------------------------------------------------------------------------
# Inside ORT: LayerNorm -> SparseLinear reading its uint8 output, against SparseLinear reading
# the float output (which quantizes it the same way itself).

D, N = 64, 48


def ln_linear_model(rng, *, u8=True, bad_scale_shape=False, axis=None):
    gamma = rng.standard_normal(D).astype(np.float32)
    beta = rng.standard_normal(D).astype(np.float32)
    w = block_sparse_weight(N, D, 0.5, (1, 4), rng)
    w_scale = (rng.random(N) * 0.02 + 1e-3).astype(np.float32)
    blob = np.frombuffer(_native.pack_weight(w, w_scale, (1, 4)), np.uint8)
    attrs = {"epsilon": 1e-5} | ({} if axis is None else {"axis": axis})
    ln = helper.make_node(
        "LayerNorm", ["x", "gamma", "beta"], ["y", "yq", "s", "z"], domain=OP_DOMAIN, **attrs
    )
    scale_in = "s_bad" if bad_scale_shape else "s"
    inputs = ["yq", "w", "", "", "", "", "", "", scale_in, "z"] if u8 else ["y", "w"]
    nodes = [ln, helper.make_node("SparseLinear", inputs, ["out"], domain=OP_DOMAIN)]
    if bad_scale_shape:
        nodes.insert(1, helper.make_node("Unsqueeze", ["s", "axes"], ["s_bad"]))
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(beta, "beta"),
        numpy_helper.from_array(blob, "w"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "ln_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", "d"])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        ],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


@pytest.mark.parametrize("isa", PATHS)
def test_ort_u8_input_equals_float_input(isa, monkeypatch):
    need(isa)
    monkeypatch.setenv("FASTONNX_ISA", isa)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, D)).astype(np.float32)
    x[1, 4, 10] = np.nan
    seed = np.random.default_rng(4)
    u8 = fastonnx.make_session(ln_linear_model(seed, u8=True), 2).run(None, {"x": x})
    seed = np.random.default_rng(4)
    fl = fastonnx.make_session(ln_linear_model(seed, u8=False), 2).run(None, {"x": x})
    np.testing.assert_array_equal(u8[1], fl[1])  # the LayerNorm float output
    np.testing.assert_array_equal(u8[0], fl[0])  # bit-identical linear outputs
    assert np.isnan(u8[0][1, 4]).all() and np.isfinite(np.delete(u8[0].reshape(-1, N), 13, 0)).all()


def test_ort_empty_batch():
    sess = fastonnx.make_session(ln_linear_model(np.random.default_rng(5)))
    out, y = sess.run(None, {"x": np.zeros((0, 3, D), np.float32)})
    assert out.shape == (0, 3, N) and y.shape == (0, 3, D)


def test_ort_bad_input():
    rng = np.random.default_rng(6)
    sess = fastonnx.make_session(ln_linear_model(rng, bad_scale_shape=True))
    with pytest.raises(Exception, match="x_row_scale must be float32 with X's leading dimensions"):
        sess.run(None, {"x": np.zeros((2, 3, D), np.float32)})
    sess = fastonnx.make_session(ln_linear_model(rng))
    with pytest.raises(Exception, match=r"gamma must be float32 \[65\] \(X's last dimension\)"):
        sess.run(None, {"x": np.zeros((2, 3, D + 1), np.float32)})
    with pytest.raises(Exception, match="axis must be -1"):
        fastonnx.make_session(ln_linear_model(rng, axis=1))


def test_ort_row_scale_needs_uint8_x():
    rng = np.random.default_rng(7)
    w = block_sparse_weight(N, D, 0.5, (1, 4), rng)
    blob = np.frombuffer(_native.pack_weight(w, np.ones(N, np.float32), (1, 4)), np.uint8)
    node = helper.make_node(
        "SparseLinear", ["x", "w", "", "", "", "", "", "", "s", "z"], ["out"], domain=OP_DOMAIN
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, D]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("z", TensorProto.UINT8, [2]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(blob, "w")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()
    feeds = {
        "x": np.ones((2, D), np.float32),
        "s": np.ones(2, np.float32),
        "z": np.zeros(2, np.uint8),
    }
    with pytest.raises(Exception, match="X must be uint8"):
        fastonnx.make_session(model).run(None, feeds)


# ------------------------------------------------------------------------------------------
# The pass on whole encoders


def cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(model: ir.Model, feeds):
    data = ir.serde.serialize_model(model).SerializeToString()
    return fastonnx.make_session(data, 2).run(None, feeds)[0]


@pytest.mark.parametrize(
    "combo", [Combo("bert", "sdpa", "dynamo"), Combo("distilbert", "eager", "legacy")], ids=str
)
def test_pass_on_encoders(encoder_exports, combo, monkeypatch):
    exported = encoder_exports.get(combo)
    kwargs = dict(preset="sparse-int8", min_sparsity=0.0, num_samples=4)
    result = optimizer.optimize(exported.path, **kwargs)
    layers = exported.num_layers
    report = next(p for p in result.report.passes if p.name == "lower_layer_norm").details
    # Each layer's two LayerNorms feed the next linear layer, except the encoder's last; the
    # embeddings' LayerNorm feeds layer 0.
    assert len(report.lowered) == 2 * layers and report.linear_layers == 2 * layers
    assert [k.reason for k in report.skipped] == ["feeds no SparseLinear that quantizes it per row"]
    ops = Counter(n.op_type for n in result.model.graph)
    assert ops["LayerNorm"] == 2 * layers and ops["LayerNormalization"] == 1

    steps = tuple(s for s in optimizer.PRESETS["sparse-int8"] if s != "lower_layer_norm")
    monkeypatch.setitem(optimizer.PRESETS, "sparse-int8", steps)
    base = optimizer.optimize(exported.path, **kwargs)
    feeds = encoder_inputs(exported.input_names, exported.pad_token_id, batch=2, seq_len=11)
    got, want = run(result.model, feeds), run(base.model, feeds)
    assert np.isfinite(got).all()
    assert cosine(got, want) >= 0.99999, cosine(got, want)


def test_pass_keeps_layer_norm_without_sparse_consumers(encoder_exports):
    exported = encoder_exports.get(Combo("bert", "sdpa", "dynamo"))
    model = optimizer.optimize(exported.path, preset="int8", num_samples=2).model
    before = Counter(n.op_type for n in model.graph)
    report = lower_layer_norm(model)
    assert not report.lowered and report.skipped
    assert all(
        k.reason == "feeds no SparseLinear that quantizes it per row" for k in report.skipped
    )
    assert Counter(n.op_type for n in model.graph) == before
