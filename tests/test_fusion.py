"""Fusion passes: micro-graphs per fusion, a negative case, and the export matrix end to end.

Dimension letters: B batch, S sequence, N heads, H head size, D hidden size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from encoders import DECOMPOSED, MATRIX, encoder_inputs, run_ort
from onnx import TensorProto, helper, numpy_helper

from fastonnx.passes.cleanup import cleanup
from fastonnx.passes.fuse_attention import explain_attention, fuse_attention
from fastonnx.passes.fuse_bias_gelu import fuse_bias_gelu
from fastonnx.passes.fuse_gelu import fuse_gelu
from fastonnx.passes.fuse_layer_norm import fuse_layer_norm
from fastonnx.passes.fuse_skip_layer_norm import fuse_skip_layer_norm
from fastonnx.passes.fusion import FUSIONS, fuse_encoder

IR_VERSION = 10  # ORT 1.31 loads IR <= 13; onnx 1.23 would write 14 by default
TOLERANCE = 1e-4
B, S, N, H = 2, 5, 4, 8
D = N * H


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def make_model(nodes, inputs, outputs, initializers=(), opset=20) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "micro", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)


def tensor_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def op_counts(model: ir.Model | onnx.ModelProto) -> Counter:
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    return Counter(node.op_type for node in nodes)


def to_bytes(model: ir.Model) -> bytes:
    # Weights the dynamo exporter wrote as external data are read in first: ORT resolves
    # external paths of a model given as bytes against the working directory.
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model).SerializeToString()


def assert_same_outputs(original: onnx.ModelProto | str, fused: ir.Model, feeds) -> None:
    source = original.SerializeToString() if isinstance(original, onnx.ModelProto) else original
    expected = run_ort(source, feeds)
    actual = run_ort(to_bytes(fused), feeds)
    assert actual.shape == expected.shape
    diff = float(np.abs(actual - expected).max())
    assert diff <= TOLERANCE, f"max abs diff {diff} > {TOLERANCE}"


def random(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Clean-up
# ------------------------------------------------------------------------------------------


def test_cleanup_inlines_and_makes_reshape_targets_constant():
    """A local function is inlined; a Shape-computed head split becomes Reshape(x, [0, 0, N, H])."""
    double = helper.make_function(
        "local",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 20)],
    )
    nodes = [
        helper.make_node("Double", ["x"], ["doubled"], domain="local"),
        helper.make_node("Shape", ["doubled"], ["batch"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["full_shape"]),
        helper.make_node("Gather", ["full_shape", "one"], ["seq_scalar"], axis=0),
        helper.make_node("Unsqueeze", ["seq_scalar", "zero_axis"], ["seq"]),
        helper.make_node("Concat", ["batch", "seq", "heads_size"], ["target"], axis=0),
        helper.make_node("Reshape", ["doubled", "target"], ["y"]),
    ]
    inits = [
        const("one", np.int64(1)),
        const("zero_axis", np.array([0], np.int64)),
        const("heads_size", np.array([N, H], np.int64)),
    ]
    graph = helper.make_graph(
        nodes, "micro", [tensor_input("x", ["B", "S", D])], [tensor_input("y", None)], inits
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("local", 1)],
        ir_version=IR_VERSION,
        functions=[double],
    )
    model = ir.serde.deserialize_model(proto)
    counts = cleanup(model)
    assert counts["functions_inlined"] == 1 and not model.functions
    assert counts["shapes_simplified"] >= 1
    ops = op_counts(model)
    assert ops["Shape"] == ops["Gather"] == ops["Concat"] == 0, ops
    (reshape,) = [node for node in model.graph if node.op_type == "Reshape"]
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 0, N, H]
    assert_same_outputs(proto, model, {"x": random(B, S, D)})


# ------------------------------------------------------------------------------------------
# Micro-graphs, one per fusion
# ------------------------------------------------------------------------------------------


def decomposed_layer_norm_model(opset: int, *, bias: bool = True) -> onnx.ModelProto:
    """x -> (x - mean) / sqrt(var + eps) * scale (+ bias), axes as attribute or input."""
    nodes, inits = [], [const("scale", random(D, seed=1)), const("two", np.float32(2.0))]
    inits.append(const("eps", np.float32(1e-5)))
    if opset >= 18:
        inits.append(const("axes", np.array([-1], np.int64)))
        nodes.append(helper.make_node("ReduceMean", ["x", "axes"], ["mean"]))
    else:
        nodes.append(helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]))
    nodes += [
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["squared"]),
    ]
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMean", ["squared", "axes"], ["var"]))
    else:
        nodes.append(helper.make_node("ReduceMean", ["squared"], ["var"], axes=[-1]))
    nodes += [
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Mul", ["normalized", "scale"], ["y" if not bias else "scaled"]),
    ]
    if bias:
        inits.append(const("bias", random(D, seed=2)))
        nodes.append(helper.make_node("Add", ["scaled", "bias"], ["y"]))
    return make_model(
        nodes, [tensor_input("x", ["B", "S", D])], [tensor_input("y", None)], inits, opset
    )


@pytest.mark.parametrize("opset", [14, 18])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_layer_norm_micro(opset, bias):
    proto = decomposed_layer_norm_model(opset, bias=bias)
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert fuse_layer_norm(model) == 1
    ops = op_counts(model)
    assert ops["LayerNormalization"] == 1
    assert ops["ReduceMean"] == 0 and ops["Add"] == 0, "bias or epsilon Add left outside"
    assert_same_outputs(proto, model, {"x": random(B, S, D, seed=3)})


def test_skip_layer_norm_micro():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["projected"]),
        helper.make_node("Add", ["bias", "projected"], ["biased"]),  # legacy-exporter order
        helper.make_node("Add", ["biased", "residual"], ["summed"]),
        helper.make_node("LayerNormalization", ["summed", "gamma", "beta"], ["y"], axis=-1),
    ]
    inits = [
        const("w", random(D, D, seed=1)),
        const("bias", random(D, seed=2)),
        const("gamma", random(D, seed=3)),
        const("beta", random(D, seed=4)),
    ]
    inputs = [tensor_input("x", ["B", "S", D]), tensor_input("residual", ["B", "S", D])]
    proto = make_model(nodes, inputs, [tensor_input("y", ["B", "S", D])], inits)
    feeds = {"x": random(B, S, D, seed=5), "residual": random(B, S, D, seed=6)}

    folded = ir.serde.deserialize_model(proto)
    cleanup(folded)
    assert fuse_skip_layer_norm(folded) == 1
    ops = op_counts(folded)
    assert ops["SkipLayerNormalization"] == 1 and ops["Add"] == 0 and ops["MatMul"] == 1
    assert_same_outputs(proto, folded, feeds)

    kept = ir.serde.deserialize_model(proto)
    cleanup(kept)
    assert fuse_skip_layer_norm(kept, fold_bias=False) == 1
    assert op_counts(kept)["Add"] == 1, "fold_bias=False must keep the projection's bias Add"
    assert_same_outputs(proto, kept, feeds)


def erf_gelu_nodes(arrangement: str, x: str, y: str) -> list[onnx.NodeProto]:
    nodes = [
        helper.make_node("Div", [x, "root2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["one_plus"]),
    ]
    if arrangement == "half_outside":
        nodes += [
            helper.make_node("Mul", [x, "one_plus"], ["product"]),
            helper.make_node("Mul", ["product", "half"], [y]),
        ]
    elif arrangement == "half_inside":
        nodes += [
            helper.make_node("Mul", ["one_plus", "half"], ["halved"]),
            helper.make_node("Mul", ["halved", x], [y]),  # x second: covered by commuting
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["half", x], ["half_x"]),  # constant first: reordered
            helper.make_node("Mul", ["half_x", "one_plus"], [y]),
        ]
    return nodes


GELU_CONSTANTS = [
    const("root2", np.float32(math.sqrt(2.0))),
    const("one", np.float32(1.0)),
    const("half", np.float32(0.5)),
]


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("arrangement", ["half_outside", "half_inside", "half_first"])
def test_gelu_micro(arrangement, opset):
    proto = make_model(
        erf_gelu_nodes(arrangement, "x", "y"),
        [tensor_input("x", ["B", "S", D])],
        [tensor_input("y", None)],
        GELU_CONSTANTS,
        opset,
    )
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert fuse_gelu(model) == 1
    (gelu,) = [node for node in model.graph if node.op_type == "Gelu"]
    # ONNX Gelu exists from opset 20; before that the contrib op is used.
    assert gelu.domain == ("" if opset >= 20 else "com.microsoft")
    assert op_counts(model)["Erf"] == 0
    assert_same_outputs(proto, model, {"x": random(B, S, D, seed=1) * 3})


@pytest.mark.parametrize("contrib", [False, True], ids=["onnx_gelu", "contrib_gelu"])
def test_bias_gelu_micro(contrib):
    domain = "com.microsoft" if contrib else ""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["biased"]),
        helper.make_node("Gelu", ["biased"], ["y"], domain=domain),
    ]
    inits = [const("w", random(D, 2 * D, seed=1)), const("bias", random(2 * D, seed=2))]
    proto = make_model(nodes, [tensor_input("x", ["B", "S", D])], [tensor_input("y", None)], inits)
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert fuse_bias_gelu(model) == 1
    ops = op_counts(model)
    assert ops["BiasGelu"] == 1 and ops["Gelu"] == 0 and ops["MatMul"] == 1
    assert_same_outputs(proto, model, {"x": random(B, S, D, seed=3)})


def attention_model(
    *, mask_seq_axis: bool, nan_guard: bool, scale_query: bool, head_split=(0, 0, N, H)
) -> onnx.ModelProto:
    """Self-attention from q/k/v [B, S, D] with an additive mask, as exporters write it.

    ``mask_seq_axis``: mask [B, 1, S, S] (transformers) or [B, 1, 1, S] (padding only).
    ``scale_query``: divide Q by sqrt(H) before the product, else multiply the scores.
    """
    inits = [
        const("split", np.array(head_split, np.int64)),
        const("merge", np.array([0, 0, D], np.int64)),
        const("sqrt_h", np.float32(math.sqrt(H))),
        const("inv_sqrt_h", np.float32(1 / math.sqrt(H))),
        const("zero", np.float32(0.0)),
    ]
    nodes = [
        helper.make_node("Reshape", ["q", "split"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["q_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "split"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", "split"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["v_t"], perm=[0, 2, 1, 3]),
    ]
    if scale_query:
        nodes += [
            helper.make_node("Div", ["q_t", "sqrt_h"], ["q_s"]),
            helper.make_node("MatMul", ["q_s", "k_t"], ["scores"]),
        ]
    else:
        nodes += [
            helper.make_node("MatMul", ["q_t", "k_t"], ["raw_scores"]),
            helper.make_node("Mul", ["raw_scores", "inv_sqrt_h"], ["scores"]),
        ]
    nodes += [
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    if nan_guard:
        nodes += [
            helper.make_node("IsNaN", ["probs"], ["is_nan"]),
            helper.make_node("Where", ["is_nan", "zero", "probs"], ["probs_ok"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["probs_ok" if nan_guard else "probs", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge"], ["y"]),
    ]
    mask_shape = ["B", 1, "S", "S"] if mask_seq_axis else ["B", 1, 1, "S"]
    inputs = [tensor_input(name, ["B", "S", D]) for name in "qkv"]
    inputs.append(tensor_input("mask", mask_shape))
    return make_model(nodes, inputs, [tensor_input("y", ["B", "S", D])], inits)


def attention_feeds(mask_seq_axis: bool) -> dict[str, np.ndarray]:
    padding = np.ones((B, S), np.float32)
    padding[1, 3:] = 0  # real padding in the second sequence
    additive = np.where(padding > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
    mask = additive[:, None, None, :]
    if mask_seq_axis:
        mask = np.broadcast_to(mask, (B, 1, S, S)).copy()
    feeds = {name: random(B, S, D, seed=i) for i, name in enumerate("qkv")}
    feeds["mask"] = mask
    return feeds


@pytest.mark.parametrize(
    "mask_seq_axis, nan_guard, scale_query",
    [(True, False, False), (False, True, True), (True, True, False)],
    ids=["bias_BNSS", "padding_B11S_expanded", "nan_guard"],
)
def test_attention_micro(mask_seq_axis, nan_guard, scale_query):
    proto = attention_model(
        mask_seq_axis=mask_seq_axis, nan_guard=nan_guard, scale_query=scale_query
    )
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert fuse_attention(model) == 1
    ops = op_counts(model)
    assert ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0
    (mha,) = [node for node in model.graph if node.op_type == "MultiHeadAttention"]
    assert mha.attributes["num_heads"].as_int() == N
    assert math.isclose(mha.attributes["scale"].as_float(), 1 / math.sqrt(H), rel_tol=1e-6)
    assert [value.name for value in mha.inputs[:3]] == ["q", "k", "v"]
    assert mha.inputs[3] is None and mha.inputs[4] is None  # no packed bias, no key_padding_mask
    assert_same_outputs(proto, model, attention_feeds(mask_seq_axis))


def test_attention_near_miss_is_explained(caplog):
    # Reshape to [B*S/2, 2, N, H] looks like a head split but mixes batch and sequence.
    proto = attention_model(
        mask_seq_axis=True, nan_guard=False, scale_query=False, head_split=(-1, 2, N, H)
    )
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    with caplog.at_level(logging.WARNING, logger="fastonnx.passes"):
        assert fuse_attention(model, debug=True) == 0
    assert op_counts(model)["Softmax"] == 1
    misses = explain_attention(model)
    assert misses, "a failed attention match must come with a reason"
    assert misses[0].status == "CONDITION_FAILED"
    assert "does not keep axis" in misses[0].reason
    assert "near miss" in caplog.text and "does not keep axis" in caplog.text


def test_no_encoder_pattern_is_left_unchanged():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [tensor_input("x", ["B", D])],
        [tensor_input("y", ["B", D])],
        [const("w", random(D, D))],
    )
    model = ir.serde.deserialize_model(proto)
    counts = fuse_encoder(model)
    assert all(counts[name] == 0 for name in FUSIONS), counts
    assert op_counts(model) == op_counts(proto)
    assert_same_outputs(proto, model, {"x": random(3, D, seed=1)})


# ------------------------------------------------------------------------------------------
# The export matrix
# ------------------------------------------------------------------------------------------


def expected_counts(exported) -> dict[str, int]:
    """How often each fusion must fire on one of the tiny encoders, from its structure.

    Every layer has one attention block, one FFN GELU and two residual LayerNorms. The embedding
    LayerNorm is a skip LayerNorm only for RoBERTa: BERT and DistilBERT add position embeddings
    of shape [1, S, D], which is a broadcast, not a residual. Exporters at opset >= 17 / 20 emit
    LayerNormalization / Gelu themselves; below, they decompose them into the patterns we fuse.
    """
    combo, layers = exported.combo, exported.num_layers
    opset = combo.opset or 20
    return {
        "attention": layers,
        "skip_layer_norm": 2 * layers + (combo.family == "roberta"),
        "layer_norm": 0 if opset >= 17 else 2 * layers + 1,
        "gelu": 0 if opset >= 20 else layers,
        "bias_gelu": layers,
    }


def assert_projections_stay_separate(model: ir.Model) -> None:
    """Each MHA's query/key/value come from their own MatMul + bias Add, never folded in."""
    for node in model.graph:
        if node.op_type != "MultiHeadAttention":
            continue
        packed_bias = node.inputs[3] if len(node.inputs) > 3 else None
        assert packed_bias is None, "projection biases must not be packed into MHA"
        for value in node.inputs[:3]:
            add = value.producer()
            assert add is not None and add.op_type == "Add", f"{value.name} is not a bias Add"
            assert add.inputs[0].producer().op_type == "MatMul", f"{value.name}: no MatMul"
            assert add.inputs[1].const_value is not None, f"{value.name}: bias not a constant"


@pytest.mark.parametrize("combo", MATRIX + DECOMPOSED, ids=str)
def test_export_matrix_fuses(encoder_exports, combo):
    exported = encoder_exports.get(combo)
    model = ir.load(exported.path)
    counts = fuse_encoder(model)

    expected = expected_counts(exported)
    assert {name: counts[name] for name in expected} == expected

    ops = op_counts(model)
    layers = exported.num_layers
    assert ops["MultiHeadAttention"] == layers
    assert ops["Softmax"] == ops["Erf"] == ops["ReduceMean"] == 0, ops
    # Every LayerNorm of the model (embeddings + 2 per layer) ends up fused one way or another.
    assert ops["LayerNormalization"] + ops["SkipLayerNormalization"] == 2 * layers + 1
    assert ops["BiasGelu"] == layers
    assert_projections_stay_separate(model)

    feeds = encoder_inputs(exported.input_names, exported.pad_token_id)
    assert feeds["attention_mask"].min() == 0, "the check needs real padding"
    assert_same_outputs(str(exported.path), model, feeds)

    # A batch entry with nothing to attend to must not turn into NaN (see fuse_attention).
    feeds["attention_mask"][-1] = 0
    fused = run_ort(to_bytes(model), feeds)
    assert np.isfinite(fused).all()
    diff = float(np.abs(fused[0] - run_ort(str(exported.path), feeds)[0]).max())
    assert diff <= TOLERANCE, f"unpadded sequence: max abs diff {diff} > {TOLERANCE}"


def test_keep_bias_and_rerun(encoder_exports):
    """fold_bias=False keeps every linear layer as MatMul + bias Add; a second run is a no-op."""
    exported = encoder_exports.get(MATRIX[0])
    model = ir.load(exported.path)
    counts = fuse_encoder(model, fold_bias=False)
    layers = exported.num_layers
    assert counts["attention"] == layers and counts["bias_gelu"] == 0

    # Q, K, V, attention output, FFN up, FFN down: six linear layers per encoder layer.
    matmuls = [node for node in model.graph if node.op_type == "MatMul"]
    assert len(matmuls) == 6 * layers
    for matmul in matmuls:
        consumers = [use.node for use in matmul.outputs[0].uses()]
        assert [node.op_type for node in consumers] == ["Add"], f"{matmul.name} lost its bias"
    assert all(
        len(node.inputs) < 5 or node.inputs[4] is None
        for node in model.graph
        if node.op_type == "SkipLayerNormalization"
    ), "SkipLayerNormalization took a projection bias despite fold_bias=False"

    again = fuse_encoder(model)
    assert again["attention"] == 0 and again["skip_layer_norm"] == 0
    feeds = encoder_inputs(exported.input_names, exported.pad_token_id)
    assert_same_outputs(str(exported.path), model, feeds)
