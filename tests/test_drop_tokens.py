"""Token dropping (length-adaptive inference): the SelectTokens op against a NumPy reference,
and the drop_tokens pass on a packed tiny encoder (drop-and-restore semantics, bad configs)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import fastonnx
from fastonnx import optimizer
from fastonnx.passes.drop_tokens import LengthConfigError, drop_tokens

pytest.importorskip("fastonnx._native")


def reference_select(scores, offsets, ratio):
    """Kept rows and offsets: each sequence keeps ceil(ratio * n) (>= 1), its first token
    always, then the best scores (ties: earlier first, NaN last), in position order."""
    kept, new = [], [0]
    for b in range(len(offsets) - 1):
        first, n = int(offsets[b]), int(offsets[b + 1] - offsets[b])
        k = 0 if n == 0 else min(n, max(1, math.ceil(float(np.float32(ratio)) * n - 1e-9)))
        rest = sorted(
            range(first + 1, first + n),
            key=lambda i: (np.isnan(scores[i]), -np.nan_to_num(scores[i], nan=0.0), i),
        )
        kept += sorted(([first] if k else []) + rest[: max(0, k - 1)])
        new.append(new[-1] + k)
    return np.array(kept, np.int64), np.array(new, np.int64)


def select_model(ratio) -> bytes:
    node = helper.make_node(
        "SelectTokens",
        ["scores", "offsets"],
        ["kept", "new_offsets"],
        domain=fastonnx.OP_DOMAIN,
        keep_ratio=ratio,
    )
    graph = helper.make_graph(
        [node],
        "select",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["T"]),
            helper.make_tensor_value_info("offsets", TensorProto.INT64, ["O"]),
        ],
        [
            helper.make_tensor_value_info("kept", TensorProto.INT64, ["K"]),
            helper.make_tensor_value_info("new_offsets", TensorProto.INT64, ["O"]),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(fastonnx.OP_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def session(model) -> ort.InferenceSession:
    return fastonnx.make_session(model, 1)


@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5, 0.3, 0.01])
def test_select_tokens_matches_reference(ratio):
    rng = np.random.default_rng(int(ratio * 100))
    lengths = [1, 0, 7, 30, 2, 13]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    scores = rng.standard_normal(int(offsets[-1])).astype(np.float32)
    scores[10:14] = 0.25  # ties
    scores[20] = np.nan
    kept, new_offsets = session(select_model(ratio)).run(
        None, {"scores": scores, "offsets": offsets}
    )
    expected_kept, expected_offsets = reference_select(scores, offsets, ratio)
    np.testing.assert_array_equal(new_offsets, expected_offsets)
    np.testing.assert_array_equal(kept, expected_kept)
    assert set(offsets[:-1][np.diff(offsets) > 0]) <= set(kept)  # every first token kept


def test_select_tokens_on_an_empty_batch():
    sess = session(select_model(0.5))
    kept, offsets = sess.run(
        None, {"scores": np.zeros(0, np.float32), "offsets": np.zeros(1, np.int64)}
    )
    assert kept.shape == (0,) and offsets.tolist() == [0]


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_select_tokens_bad_ratio_fails_at_session_creation(ratio):
    with pytest.raises(Exception, match="keep_ratio must be in"):
        session(select_model(ratio))


@pytest.mark.parametrize(
    ("offsets", "tokens", "match"),
    [
        ([1, 3], 3, "offsets\\[0\\] is 1, not 0"),
        (
            [0, 5, 3],
            3,
            "not non-decreasing within \\[0, T=3\\]: offsets\\[0\\]=0, offsets\\[1\\]=5",
        ),
        ([0, 2], 3, "offsets\\[B=1\\]=2 is not the token count T=3"),
    ],
)
def test_select_tokens_bad_offsets_are_invalid_argument(offsets, tokens, match):
    feed = {"scores": np.zeros(tokens, np.float32), "offsets": np.array(offsets, np.int64)}
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=match):
        session(select_model(0.5)).run(None, feed)


# --------------------------------------------------------------------------------------------
# The pass


@pytest.fixture(scope="module")
def packed(tiny_bert, tmp_path_factory):
    """The tiny BERT optimized with packed execution (2 layers: one drop point)."""
    result = optimizer.optimize(tiny_bert, preset="sparse-int8", min_sparsity=0.0, num_samples=2)
    assert result.report.details("pack_tokens").applied
    path = tmp_path_factory.mktemp("drop") / "packed.onnx"
    result.save(path)
    return path


def feeds(model_path, seed=0):
    rng = np.random.default_rng(seed)
    b, s = 4, 12
    mask = np.ones((b, s), np.int64)
    mask[1, 7:] = 0
    mask[2, 1:] = 0  # one token
    mask[3, :] = 0  # all padding
    values = {
        "input_ids": rng.integers(1, 90, (b, s)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((b, s), np.int64),
    }
    names = [i.name for i in session(str(model_path)).get_inputs()]
    return {n: values[n] for n in names}, mask


def with_outputs(model: ir.Model, *names: str) -> bytes:
    """The model, serialized, with intermediate values exposed as outputs."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in names:
        model.graph.outputs.append(values[name])
    return ir.serde.serialize_model(model).SerializeToString()


def test_keep_all_changes_nothing(packed):
    model = ir.load(packed)
    report = drop_tokens(model, [1.0])
    assert not report.changed and "keeps all" in report.format()
    feed, _ = feeds(packed)
    a = session(str(packed)).run(None, feed)[0]
    b = session(ir.serde.serialize_model(model).SerializeToString()).run(None, feed)[0]
    np.testing.assert_array_equal(a, b)


def test_dropped_tokens_hold_the_output_of_the_layer_that_dropped_them(packed):
    feed, mask = feeds(packed)
    reference = ir.load(packed)
    # Layer 0's output: the LayerNorm whose output layer 1's QKV projection reads.
    second = [n for n in reference.graph if n.op_type == "Attention"][1]
    layer_out = second.inputs[0].producer().inputs[0].producer().outputs[0].name
    full, y0_packed = session(with_outputs(reference, layer_out)).run(None, feed)

    model = ir.load(packed)
    report = drop_tokens(model, [0.5])
    assert report.dropping_layers == [0] and report.changed
    out, kept, offsets = session(with_outputs(model, "layer_0/kept", "layer_0/offsets")).run(
        None, feed
    )
    lengths = mask.sum(1)
    assert np.diff(offsets).tolist() == [0 if n == 0 else max(1, math.ceil(n / 2)) for n in lengths]
    # Packed row r of sequence b is its r-th valid position (right padding here).
    starts = np.concatenate([[0], np.cumsum(lengths)])
    dropped = sorted(set(range(int(starts[-1]))) - set(kept.tolist()))
    assert dropped and all(starts[b] not in dropped for b in range(4) if lengths[b])
    for row in dropped:
        b = int(np.searchsorted(starts, row, side="right") - 1)
        np.testing.assert_array_equal(out[b, row - starts[b]], y0_packed[row])
    assert (out[mask == 0] == 0).all() and np.isfinite(out).all()
    # Sequences that keep every token (one token) end exactly as in the full model.
    np.testing.assert_array_equal(out[2], full[2])


def test_unpacked_model_is_left_unchanged_with_the_reason(tiny_bert):
    result = optimizer.optimize(
        tiny_bert, preset="sparse-int8", min_sparsity=0.0, num_samples=2, packing=False
    )
    before = len(list(result.model.graph))
    report = drop_tokens(result.model, [0.5])
    assert not report.changed and "not packed" in report.reason
    assert len(list(result.model.graph)) == before


@pytest.mark.parametrize(
    ("ratios", "match"),
    [
        ([0.5, 0.5], "takes 1 \\(one per layer but the last\\)"),
        ([0.0], "in \\(0, 1\\]"),
        ([2.0], "in \\(0, 1\\]"),
    ],
)
def test_bad_length_config(packed, ratios, match):
    with pytest.raises(LengthConfigError, match=match):
        drop_tokens(ir.load(packed), ratios)


def test_optimize_applies_a_length_config(tiny_bert, packed):
    result = optimizer.optimize(
        tiny_bert, preset="sparse-int8", min_sparsity=0.0, num_samples=2, length_config=[0.5]
    )
    assert result.report.details("drop_tokens").dropping_layers == [0]
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("SelectTokens") == 1 and ops.count("ScatterND") == 1
    # Layer 1 runs on fewer rows: its values no longer claim the packed token dim.
    second = [n for n in result.model.graph if n.op_type == "Attention"][1]
    first = [n for n in result.model.graph if n.op_type == "Attention"][0]
    assert second.outputs[0].shape.dims[0] != first.outputs[0].shape.dims[0]
    feed, mask = feeds(packed)
    out = session(ir.serde.serialize_model(result.model).SerializeToString()).run(None, feed)[0]
    assert out.shape == (*mask.shape, 64) and (out[mask == 0] == 0).all()
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
