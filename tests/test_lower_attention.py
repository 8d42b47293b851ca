"""Attention lowering (MultiHeadAttention -> com.fastonnx::Attention) and the Q/K/V merge: micro
graphs with the expected op counts and reasons, and whole-model parity under ORT.

Dimension letters: B batch, S sequence, N heads, H head size, D hidden size.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from encoders import Combo, encoder_inputs, run_ort
from onnx import TensorProto, helper, numpy_helper

_native = pytest.importorskip("fastonnx._native")
ort = pytest.importorskip("onnxruntime")

import fastonnx  # noqa: E402
from fastonnx import optimizer  # noqa: E402
from fastonnx.passes.cleanup import cleanup  # noqa: E402
from fastonnx.passes.fuse_attention import fuse_attention  # noqa: E402
from fastonnx.passes.lower_attention import lower_attention  # noqa: E402
from tests.kernel_reference import block_sparse_weight  # noqa: E402
from tests.test_fusion import attention_feeds, attention_model  # noqa: E402

LOWEST = np.finfo(np.float32).min


def op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)


def to_bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def fast(model: ir.Model | bytes, feeds, threads=1):
    data = model if isinstance(model, bytes) else to_bytes(model)
    return fastonnx.make_session(data, threads).run(None, feeds)[0]


def cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def fused(proto) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert fuse_attention(model) == 1
    common_passes.CommonSubexpressionEliminationPass()(model)
    return model


@pytest.mark.parametrize(
    "mask_seq_axis, nan_guard",
    [(True, False), (False, True), (True, True)],
    ids=["bias_BNSS", "padding_B11S_expanded_clamped", "bias_BNSS_clamped"],
)
def test_mha_becomes_attention(mask_seq_axis, nan_guard):
    proto = attention_model(mask_seq_axis=mask_seq_axis, nan_guard=nan_guard, scale_query=False)
    model = fused(proto)
    report = lower_attention(model)
    assert report.counts["Attention"] == 1 and not report.skipped
    ops = op_counts(model)
    assert ops["Attention"] == 1 and ops["MultiHeadAttention"] == 0
    # fuse_attention's clamp and S-axis expansion are the op's own work: the raw mask is read.
    assert ops["Max"] == ops["Expand"] == 0, ops
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.domain == fastonnx.OP_DOMAIN and node.inputs[3].name == "mask"
    feeds = attention_feeds(mask_seq_axis)
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    got = fast(model, feeds)
    assert cosine(got, expected) >= 0.9999 and np.abs(got - expected).max() < 2e-2


def test_all_padding_row_matches_the_clamped_mha():
    """A sequence with no visible key: the op's uniform rows equal the clamped MHA's."""
    proto = attention_model(mask_seq_axis=False, nan_guard=True, scale_query=True)
    mha_model = fused(proto)
    feeds = attention_feeds(False)
    feeds["mask"][1] = -np.inf
    expected = fastonnx.make_session(to_bytes(mha_model)).run(None, feeds)[0]
    lower_attention(mha_model)
    got = fast(mha_model, feeds)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)


def mha_model(*, key_len="S", key_padding_mask=False, with_mask=True, d=64, heads=4):
    """One MultiHeadAttention node (q [B, S, D], k/v [B, key_len, D]), as fuse_attention writes."""
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", d])]
    inputs += [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", key_len, d]) for x in "kv"]
    names = ["q", "k", "v"]
    if with_mask or key_padding_mask:
        names += ["", ""]
    if key_padding_mask:
        inputs.append(helper.make_tensor_value_info("kpm", TensorProto.INT32, ["B", key_len]))
        names[4] = "kpm"
    if with_mask:
        inputs.append(
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, key_len])
        )
        names.append("mask")
    node = helper.make_node(
        "MultiHeadAttention", names, ["y"], domain="com.microsoft", num_heads=heads, name="mha"
    )
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])]
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(key_len="T"), "is not known to equal the query's"),
        (dict(key_padding_mask=True), "key_padding_mask"),
        (dict(heads=5), "num_heads=5 does not divide D=64"),
    ],
    ids=["cross_attention", "key_padding_mask", "heads"],
)
def test_near_misses_say_why(kwargs, reason):
    model = ir.serde.deserialize_model(mha_model(**kwargs))
    report = lower_attention(model)
    assert not report.lowered and op_counts(model)["MultiHeadAttention"] == 1
    assert len(report.skipped) == 1 and reason in report.skipped[0].reason, report.skipped


def test_mha_without_mask():
    proto = mha_model(with_mask=False)
    model = ir.serde.deserialize_model(proto)
    assert lower_attention(model).counts["Attention"] == 1
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((2, 11, 64)).astype(np.float32) for x in "qkv"}
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]
    assert cosine(fast(model, feeds), expected) >= 0.9999


# ------------------------------------------------------------------------------------------
# Q/K/V merge


def projected_attention(*, gelu_on=None, other_input_for=None, bias_for=("q", "k", "v"), d=64):
    """X [B, S, D] -> three SparseLinear projections -> MultiHeadAttention with a padding mask."""
    rng = np.random.default_rng(1)
    inits, nodes = [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d])]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, "S"]))
    if other_input_for:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["B", "S", d]))
    for name in "qkv":
        w = block_sparse_weight(d, d, 0.8, (1, 4), rng)
        scale = (rng.random(d) * 0.02 + 1e-3).astype(np.float32)
        blob = np.frombuffer(_native.pack_weight(w, scale, (1, 4)), np.uint8)
        inits.append(numpy_helper.from_array(blob, f"w_{name}"))
        slots = ["x2" if name == other_input_for else "x", f"w_{name}"]
        if name in bias_for:
            inits.append(
                numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), f"b_{name}")
            )
            slots.append(f"b_{name}")
        attrs = {"activation": "gelu"} if name == gelu_on else {}
        nodes.append(
            helper.make_node(
                "SparseLinear",
                slots,
                [name],
                domain=fastonnx.OP_DOMAIN,
                name=f"proj_{name}",
                **attrs,
            )
        )
    nodes.append(
        helper.make_node(
            "MultiHeadAttention",
            ["q", "k", "v", "", "", "mask"],
            ["y"],
            domain="com.microsoft",
            num_heads=4,
        )
    )
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])]
    vinfo = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", "S", d]) for x in "qkv"]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=vinfo)
    opsets = [
        helper.make_opsetid("", 20),
        helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(fastonnx.OP_DOMAIN, 1),
    ]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def qkv_feeds(extra=False, d=64):
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 13, d)).astype(np.float32)}
    mask = np.zeros((2, 1, 1, 13), np.float32)
    mask[1, ..., 9:] = LOWEST
    feeds["mask"] = mask
    if extra:
        feeds["x2"] = rng.standard_normal((2, 13, d)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("bias_for", [("q", "k", "v"), ("q", "v")], ids=["biases", "no_k_bias"])
def test_qkv_projections_merge_into_one(bias_for):
    proto = projected_attention(bias_for=bias_for)
    separate = ir.serde.deserialize_model(proto)
    lower_attention(separate, merge_projections=False)
    merged = ir.serde.deserialize_model(proto)
    report = lower_attention(merged)
    assert len(report.merged_qkv) == 1 and not report.unmerged_qkv
    ops = op_counts(merged)
    assert ops["SparseLinear"] == 1 and ops["Attention"] == 1, ops
    (linear,) = [n for n in merged.graph if n.op_type == "SparseLinear"]
    w, _, block = _native.unpack_weight(linear.inputs[1].const_value.numpy())
    assert w.shape == (192, 64) and tuple(block) == (1, 4)
    (attention,) = [n for n in merged.graph if n.op_type == "Attention"]
    assert attention.inputs[0] is linear.outputs[0] and attention.inputs[1] is None
    feeds = qkv_feeds()
    # The merged layer computes what the three did (same per-row quantization of x).
    np.testing.assert_allclose(fast(merged, feeds), fast(separate, feeds), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(gelu_on="k"), "has an activation"),
        (dict(other_input_for="v"), "read different inputs"),
    ],
)
def test_qkv_merge_near_misses_say_why(kwargs, reason):
    model = ir.serde.deserialize_model(projected_attention(**kwargs))
    report = lower_attention(model)
    assert report.counts["Attention"] == 1 and not report.merged_qkv
    assert len(report.unmerged_qkv) == 1 and reason in report.unmerged_qkv[0].reason
    assert op_counts(model)["SparseLinear"] == 3
    feeds = qkv_feeds(extra="other_input_for" in kwargs)
    assert np.isfinite(fast(model, feeds)).all()


# ------------------------------------------------------------------------------------------
# Whole models


@pytest.mark.parametrize(
    "combo",
    [Combo("bert", "sdpa", "dynamo"), Combo("roberta", "sdpa", "legacy")],
    ids=str,
)
def test_whole_model_parity(encoder_exports, combo, monkeypatch, tmp_path):
    """sparse-int8 with fastonnx's Attention against the same pipeline on ORT's MHA, and both
    against fp32. The legacy SDPA export fills its mask with -inf and guards NaN."""
    exported = encoder_exports.get(combo)
    # Padded execution: this compares the attention ops position by position (test_pack_tokens
    # covers packing).
    kwargs = dict(preset="sparse-int8", min_sparsity=0.0, num_samples=4, packing=False)
    result = optimizer.optimize(exported.path, **kwargs)
    counts = next(p for p in result.report.passes if p.name == "lower_attention").counts
    layers = exported.num_layers
    assert counts == {"Attention": layers, "QKV projections merged": layers}
    ops = op_counts(result.model)
    assert ops["Attention"] == layers and ops["MultiHeadAttention"] == 0
    assert ops["SparseLinear"] == 6 * layers - 2 * layers  # q, k, v -> one per layer

    steps = tuple(s for s in optimizer.PRESETS["sparse-int8"] if s != "lower_attention")
    monkeypatch.setitem(optimizer.PRESETS, "sparse-int8", steps)
    on_mha = optimizer.optimize(exported.path, **kwargs)
    assert op_counts(on_mha.model)["MultiHeadAttention"] == layers

    feeds = encoder_inputs(exported.input_names, exported.pad_token_id, batch=3, seq_len=13)
    feeds["attention_mask"][-1] = 0  # a sequence with nothing to attend to
    got, base = fast(result.model, feeds), fast(on_mha.model, feeds, threads=2)
    assert np.isfinite(got).all()
    assert cosine(got, base) >= 0.9999, cosine(got, base)
    reference = run_ort(str(exported.path), feeds)
    # int8 dominates the error against fp32: fastonnx's attention must not add to it.
    assert cosine(got[0], reference[0]) >= cosine(base[0], reference[0]) - 1e-4
