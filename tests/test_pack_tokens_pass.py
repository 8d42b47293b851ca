"""The pack_tokens pass on the tiny test encoders: the packed model against the padded
(``packing=False``) one on every padding pattern, every attention path, and the patterns the
pass must leave unchanged (with the reason).

Dimensions: B batch, S sequence, T valid tokens, D hidden size.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from encoders import Combo, encoder_inputs

_native = pytest.importorskip("fastonnx._native")
ort = pytest.importorskip("onnxruntime")

import fastonnx  # noqa: E402
from fastonnx import optimizer  # noqa: E402
from fastonnx.passes.pack_tokens import pack_tokens, plan_packing  # noqa: E402
from tests.test_pack_tokens import PATTERNS, attention_mask  # noqa: E402

COMBOS = [
    Combo("bert", "sdpa", "dynamo"),
    Combo("roberta", "sdpa", "legacy"),
    Combo("distilbert", "eager", "dynamo"),
]
_PADDED: dict[Combo, tuple[bytes, tuple[str, ...], int]] = {}


def padded_model(encoder_exports, combo: Combo) -> tuple[bytes, tuple[str, ...], int]:
    """The sparse-int8 model without packing (serialized), its input names and pad token."""
    if combo not in _PADDED:
        exported = encoder_exports.get(combo)
        result = optimizer.optimize(
            exported.path, preset="sparse-int8", min_sparsity=0.0, num_samples=4, packing=False
        )
        data = ir.serde.serialize_model(result.model).SerializeToString()
        _PADDED[combo] = (data, exported.input_names, exported.pad_token_id)
    return _PADDED[combo]


def load(data: bytes) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.onnx.ModelProto.FromString(data))


def packed_model(data: bytes) -> tuple[bytes, object]:
    model = load(data)
    report = pack_tokens(model)
    return ir.serde.serialize_model(model).SerializeToString(), report


def feeds_for(names, pad, pattern: str, b: int, s: int, seed: int = 0):
    feeds = encoder_inputs(names, pad, batch=b, seq_len=s, seed=seed)
    mask = attention_mask(pattern, b, s, seed=seed)
    feeds["attention_mask"] = mask
    feeds["input_ids"] = np.where(mask == 1, feeds["input_ids"], pad)
    return feeds


def cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_packed_matches(packed: np.ndarray, padded: np.ndarray, mask: np.ndarray, case: str):
    valid = mask.astype(bool)
    assert packed.shape == padded.shape, case
    assert np.all(packed[~valid] == 0), f"{case}: padded positions are not exactly 0"
    if valid.any():
        c = cosine(packed[valid], padded[valid])
        assert c >= 0.9999, f"{case}: cosine {c:.6f} at valid positions"


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_packed_model_matches_padded_on_every_pattern(encoder_exports, combo):
    data, names, pad = padded_model(encoder_exports, combo)
    packed, report = packed_model(data)
    assert report.applied, report.reason
    assert report.attention_nodes == 2 and report.outputs == ["last_hidden_state"]
    ops = Counter(n.op_type for n in load(packed).graph)
    assert ops["PackTokens"] == 1 and ops["UnpackTokens"] == 1 and ops["Attention"] == 2
    # The drop-in contract: same inputs and outputs as the padded model.
    before, after = load(data).graph, load(packed).graph
    assert [(v.name, v.dtype) for v in after.inputs] == [(v.name, v.dtype) for v in before.inputs]
    assert [(v.name, str(v.shape)) for v in after.outputs] == [
        (v.name, str(v.shape)) for v in before.outputs
    ]
    padded_session = fastonnx.make_session(data, 1)
    packed_session = fastonnx.make_session(packed, 2)
    for pattern in PATTERNS:
        for b, s in ((3, 13), (1, 9), (5, 21)):
            feeds = feeds_for(names, pad, pattern, b, s, seed=b + s)
            want = padded_session.run(None, feeds)[0]
            got = packed_session.run(None, feeds)[0]
            case = f"{combo} pattern={pattern} B={b} S={s}"
            assert_packed_matches(got, want, feeds["attention_mask"], case)


def _with_first_token_output(data: bytes) -> bytes:
    """The padded model plus a classifier-style output: Gather(position 0) of the states."""
    model = load(data)
    out = model.graph.outputs[0]
    zero = ir.Value(name="position_0", const_value=ir.tensor(np.int64(0)))
    model.graph.register_initializer(zero)
    node = ir.node("Gather", [out, zero], attributes={"axis": 1}, name="first_token")
    node.outputs[0].name, node.outputs[0].dtype = "cls", ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape([out.shape.dims[0], out.shape.dims[2]])
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    return ir.serde.serialize_model(model).SerializeToString()


def test_position_selectors_read_the_restored_states(encoder_exports):
    """A classifier head's first-token Gather reads UnpackTokens' output: the same vector
    wherever position 0 is a token, 0 where it is padding."""
    data, names, pad = padded_model(encoder_exports, COMBOS[0])
    data = _with_first_token_output(data)
    packed, report = packed_model(data)
    assert report.applied, report.reason
    assert report.outputs == ["last_hidden_state", "Gather 'first_token' (reads positions)"]
    assert Counter(n.op_type for n in load(packed).graph)["UnpackTokens"] == 1
    padded_session, packed_session = (fastonnx.make_session(d, 1) for d in (data, packed))
    for pattern in PATTERNS:
        feeds = feeds_for(names, pad, pattern, 4, 11, seed=7)
        want = padded_session.run(None, feeds)[1]
        got = packed_session.run(None, feeds)[1]
        first = feeds["attention_mask"][:, :1]
        assert_packed_matches(got[:, None], want[:, None], first, f"cls pattern={pattern}")


@pytest.mark.parametrize("isa", _native.all_isas())
def test_every_attention_path(encoder_exports, isa, monkeypatch):
    monkeypatch.setenv("FASTONNX_ISA", isa)
    reason = _native.isa_unavailable_reason(isa)
    path = {"ref": "ref", "avx2": "avx2_f32", "avx512_vnni": "avx512_bf16", "amx": "amx_bf16"}[isa]
    reason = reason or _native.attention_path_unavailable_reason(path)
    if reason:
        pytest.skip(f"FASTONNX_ISA={isa}: {reason}")
    data, names, pad = padded_model(encoder_exports, COMBOS[0])
    packed, _ = packed_model(data)
    feeds = feeds_for(names, pad, "holes", 4, 17, seed=3)
    want = fastonnx.make_session(data, 1).run(None, feeds)[0]
    got = fastonnx.make_session(packed, 1).run(None, feeds)[0]
    assert_packed_matches(got, want, feeds["attention_mask"], f"FASTONNX_ISA={isa}")


def test_layers_left_on_ort_int8_keep_the_model_padded(encoder_exports):
    """A layer kept on ORT's QDQ int8 path (AVX2 CPUs keep dense ones there) would run as a float
    Gemm on 2-D packed tokens: packing is not applied, and the report says why."""
    exported = encoder_exports.get(COMBOS[0])
    result = optimizer.optimize(
        exported.path, preset="sparse-int8", min_sparsity=1.0, num_samples=2
    )
    report = result.report.details("pack_tokens")
    assert not report.applied and "kept on ORT's int8 path" in report.reason, report.reason
    assert Counter(n.op_type for n in result.model.graph)["PackTokens"] == 0


def test_optimize_packs_by_default_and_says_so(encoder_exports):
    exported = encoder_exports.get(COMBOS[0])
    kwargs = dict(preset="sparse-int8", min_sparsity=0.0, num_samples=2)
    on = optimizer.optimize(exported.path, **kwargs)
    assert on.report.details("pack_tokens").applied
    assert any(n.startswith("packed execution: ") for n in on.report.notes), on.report.notes
    off = optimizer.optimize(exported.path, packing=False, **kwargs)
    assert not off.report.details("pack_tokens").applied
    assert "packed execution not applied: turned off (--no-packing)" in off.report.notes
    assert "pack_tokens" not in optimizer.PRESETS["int8"]  # no fastonnx Attention there


def test_bad_mask_at_run_time_is_invalid_argument(encoder_exports):
    data, names, pad = padded_model(encoder_exports, COMBOS[0])
    packed, _ = packed_model(data)
    feeds = feeds_for(names, pad, "ragged", 2, 7)
    feeds["attention_mask"][1, 2] = 3
    with pytest.raises(Exception, match="INVALID_ARGUMENT.*attention_mask\\[1,2\\] is 3"):
        fastonnx.make_session(packed, 1).run(None, feeds)


# ------------------------------------------------------------------------------------------
# Left unchanged, with the reason


def _node(model: ir.Model, op_type: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op_type)


def _non_token_op_after_encoder(model: ir.Model) -> None:
    """A Softmax over the sequence axis on the output: not per token."""
    out = model.graph.outputs[0]
    node = ir.node("Softmax", [out], attributes={"axis": 1}, name="over_sequence")
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "y", out.dtype, out.shape
    model.graph.append(node)
    model.graph.outputs[0] = node.outputs[0]


def _causal_mask(model: ir.Model) -> None:
    """Keys beyond the query hidden too (Trilu over the mask): not a key-padding mask."""
    attention = [n for n in model.graph if n.op_type == "Attention"]
    mask = attention[0].inputs[3]
    lowest = ir.Value(name="lowest", const_value=ir.tensor(np.float32(np.finfo(np.float32).min)))
    model.graph.register_initializer(lowest)
    upper = ir.node("Trilu", [mask], attributes={"upper": 1}, name="causal")
    upper.outputs[0].name, upper.outputs[0].dtype = "causal_mask", ir.DataType.FLOAT
    upper.outputs[0].shape = mask.shape
    model.graph.insert_after(mask.producer(), upper)
    for node in attention:
        node.replace_input_with(3, upper.outputs[0])


def _finite_fill(model: ir.Model) -> None:
    """An older exporter's -10000 fill: added, not skipped; packing would change results."""
    mask = _node(model, "Attention").inputs[3]
    ten_k = ir.Value(name="minus_10k", const_value=ir.tensor(np.float32(-1e4)))
    model.graph.register_initializer(ten_k)
    clamp = ir.node("Max", [mask, ten_k], name="clamp")
    clamp.outputs[0].name, clamp.outputs[0].dtype = "clamped", ir.DataType.FLOAT
    clamp.outputs[0].shape = mask.shape
    model.graph.insert_after(mask.producer(), clamp)
    for node in [n for n in model.graph if n.op_type == "Attention"]:
        node.replace_input_with(3, clamp.outputs[0])


def _no_mask(model: ir.Model) -> None:
    for node in [n for n in model.graph if n.op_type == "Attention"]:
        node.replace_input_with(3, None)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_non_token_op_after_encoder, "Softmax 'over_sequence' after the embeddings"),
        (_causal_mask, "not a pure key-padding mask of 'attention_mask'"),
        (_finite_fill, "not a pure key-padding mask of 'attention_mask'"),
        (_no_mask, "Attention has no mask"),
    ],
    ids=["non_token_op", "causal_mask", "finite_fill", "no_mask"],
)
def test_unsupported_patterns_are_left_unchanged(encoder_exports, mutate, reason):
    data, names, pad = padded_model(encoder_exports, COMBOS[0])
    model = load(data)
    mutate(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    report = pack_tokens(model)
    assert not report.applied and reason in report.reason, report.reason
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert isinstance(plan_packing(model), str)
    # Still runs as it did.
    feeds = feeds_for(names, pad, "ragged", 2, 9)
    assert np.isfinite(fastonnx.make_session(before, 1).run(None, feeds)[0]).all()


def test_packing_twice_changes_nothing(encoder_exports):
    data, _, _ = padded_model(encoder_exports, COMBOS[0])
    packed, _ = packed_model(data)
    again, report = packed_model(packed)
    assert not report.applied and "already packed" in report.reason
    assert again == packed


def test_model_without_fastonnx_attention_is_left_unchanged(encoder_exports):
    exported = encoder_exports.get(COMBOS[0])
    result = optimizer.optimize(exported.path, preset="int8", num_samples=2)
    report = pack_tokens(result.model)
    assert not report.applied and "no com.fastonnx::Attention" in report.reason
