"""Shape inference of the passes (fastonnx.passes.shapes): fastonnx's ops are registered with
onnx-shape-inference, dynamo exports need no fallback, and what cannot be inferred keeps its
old shape."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from fastonnx.passes import shapes
from fastonnx.runtime import OP_DOMAIN

_native = pytest.importorskip("fastonnx._native")

K, N, D, HEADS = 8, 24, 8, 2  # N = 3 * D: one packed-QKV projection


def _no_fallback(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ORT's symbolic shape inference ran: onnx-shape-inference fell short")

    monkeypatch.setattr(shapes, "_ort_symbolic_shapes", fail)


def _fastonnx_graph() -> ir.Model:
    """x [B, S, K] -> SparseLinear (N=3D) -> PackTokens -> Attention (packed QKV) ->
    LayerNorm -> UnpackTokens -> y [B, S, D]; every intermediate shape left blank."""
    rng = np.random.default_rng(0)
    w = rng.integers(-3, 4, (N, K)).astype(np.int8)
    blob = _native.pack_weight(w, np.full(N, 0.1, np.float32), (1, 4))
    inits = [
        helper.make_tensor("W", TensorProto.UINT8, [len(blob)], bytes(blob), raw=True),
        helper.make_tensor("gamma", TensorProto.FLOAT, [D], np.ones(D, np.float32)),
    ]
    nodes = [
        helper.make_node("SparseLinear", ["x", "W"], ["qkv"], domain=OP_DOMAIN),
        helper.make_node("PackTokens", ["qkv", "mask"], ["packed", "offsets"], domain=OP_DOMAIN),
        helper.make_node(
            "Attention",
            ["packed", "", "", "", "offsets"],
            ["context"],
            domain=OP_DOMAIN,
            num_heads=HEADS,
        ),
        helper.make_node(
            "LayerNorm", ["context", "gamma"], ["ln", "lnq", "scale", "zp"], domain=OP_DOMAIN
        ),
        helper.make_node("UnpackTokens", ["ln", "offsets", "mask"], ["y"], domain=OP_DOMAIN),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", D])],
        inits,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(OP_DOMAIN, 1)]
    )
    return ir.serde.deserialize_model(proto)


def _dims(value: ir.Value) -> list:
    return [d if isinstance(d, int) else str(d) for d in value.shape.dims]


def test_fastonnx_ops_get_shapes_and_types(monkeypatch):
    _no_fallback(monkeypatch)
    model = _fastonnx_graph()
    values = {v.name: v for node in model.graph for v in node.outputs}

    assert shapes.infer_shapes(model) == len(values) - 1  # all but the graph output y

    assert _dims(values["qkv"]) == ["batch", "sequence", N]
    assert values["qkv"].dtype == ir.DataType.FLOAT
    packed, offsets = values["packed"], values["offsets"]
    assert packed.shape.rank() == 2 and packed.shape.dims[1] == N
    assert offsets.dtype == ir.DataType.INT64 and offsets.shape.rank() == 1
    assert values["context"].shape.dims[1] == D  # packed QKV [T, 3D] -> [T, D]
    assert values["context"].shape.dims[0] == packed.shape.dims[0]
    assert values["lnq"].dtype == ir.DataType.UINT8 and _dims(values["lnq"])[1] == D
    assert values["scale"].shape.rank() == 1 and values["zp"].dtype == ir.DataType.UINT8


def test_sparse_linear_without_a_readable_weight_keeps_the_old_shape(monkeypatch):
    model = _fastonnx_graph()
    weight = model.graph.initializers["W"]
    weight.const_value = ir.tensor(np.zeros(16, np.uint8))  # no FXSW header
    qkv = next(v for node in model.graph for v in node.outputs if v.name == "qkv")
    qkv.shape = ir.Shape(["batch", "sequence", N])
    monkeypatch.setattr(shapes, "_ort_symbolic_shapes", lambda model, values: False)

    shapes.infer_shapes(model)

    assert _dims(qkv) == ["batch", "sequence", N]


def test_dynamo_export_needs_no_fallback(monkeypatch, tiny_bert):
    _no_fallback(monkeypatch)
    model = ir.serde.deserialize_model(onnx.load(tiny_bert))
    boundary = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    values = [v for node in model.graph for v in node.outputs if id(v) not in boundary]

    assert shapes.infer_shapes(model) == len(values)
    assert all(v.shape is not None for v in values)
