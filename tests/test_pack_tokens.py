"""Packed (padding-free) execution's ops: Attention over packed tokens with per-sequence offsets
(every kernel path against the NumPy reference and against the padded layout), PackTokens and
UnpackTokens on every padding pattern, and bad input.

Dimensions: B batch, S sequence, T valid tokens, N heads, H head size, D = N * H.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper

_native = pytest.importorskip("fastonnx._native")
ort = pytest.importorskip("onnxruntime")

import fastonnx  # noqa: E402
from tests.kernel_reference import attention_path_for_isa  # noqa: E402
from tests.test_attention_op import (  # noqa: E402
    PATHS,
    assert_matches,
    reference,
    skip_unavailable,
)

# Named padding patterns of a [B, S] attention mask (1 = token, 0 = padding).
PATTERNS = ("none", "one_token", "all_but_one", "all_padding_row", "left", "holes", "ragged")


def attention_mask(pattern: str, b: int, s: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.ones((b, s), np.int64)
    if pattern == "one_token":
        m[:, 1:] = 0
    elif pattern == "all_but_one":
        m[:, -1] = 0
    elif pattern == "all_padding_row":
        m[-1] = 0
    elif pattern == "left":
        for i in range(b):
            m[i, : i * s // (b + 1)] = 0
    elif pattern == "holes":
        m = (rng.random((b, s)) < 0.6).astype(np.int64)
        m[0, 0] = 1
    elif pattern == "ragged":
        for i in range(b):
            m[i, int(rng.integers(1, s + 1)) :] = 0
    elif pattern != "none":
        raise ValueError(pattern)
    return m


def offsets_of(mask: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)


def pack_reference(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[mask.astype(bool)]


def unpack_reference(packed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    y = np.zeros((*mask.shape, packed.shape[-1]), packed.dtype)
    y[mask.astype(bool)] = packed
    return y


def packed_reference(q, k, v, offsets, num_heads):
    """Attention of each sequence over its own tokens (float64 NumPy)."""
    out = np.zeros(q.shape, np.float64)
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        if hi > lo:
            one = (x[None, lo:hi] for x in (q, k, v))
            out[lo:hi] = reference(*one, None, num_heads)[0]
    return out


# ------------------------------------------------------------------------------------------
# The kernel through the binding


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("h", [32, 64])
def test_packed_attention_matches_reference(path, pattern, h):
    skip_unavailable(path)
    b, s, n = 3, 37, 2
    mask = attention_mask(pattern, b, s, seed=h)
    offsets = offsets_of(mask)
    t = int(offsets[-1])
    rng = np.random.default_rng(h)
    q, k, v = (rng.standard_normal((t, n * h), dtype=np.float32) for _ in range(3))
    y = _native.attention(q, k, v, num_heads=n, path=path, offsets=offsets)
    assert y.shape == (t, n * h)
    case = f"path={path} pattern={pattern} B={b} S={s} T={t} N={n} H={h}"
    if t:
        assert_matches(y, packed_reference(q, k, v, offsets, n), path, case)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pattern", ["right_padding", "holes", "all_padding_row"])
def test_packed_equals_padded_at_valid_positions(path, pattern):
    """One code path: a packed sequence computes what its padded form does (key-padding mask)."""
    skip_unavailable(path)
    b, s, n, h = 4, 45, 4, 32
    mask = attention_mask("ragged" if pattern == "right_padding" else pattern, b, s, seed=3)
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((b, s, 3 * n * h), dtype=np.float32)
    bias = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    padded = _native.attention(qkv, None, None, bias, num_heads=n, path=path)
    packed = _native.attention(
        pack_reference(qkv, mask), num_heads=n, path=path, offsets=offsets_of(mask)
    )
    valid = mask.astype(bool)
    # Same keys in the same order per query: the same arithmetic, so the same bits.
    np.testing.assert_array_equal(packed, padded[valid])


@pytest.mark.parametrize("path", PATHS)
def test_packed_threads_and_batch_one(path):
    skip_unavailable(path)
    rng = np.random.default_rng(6)
    for lengths in ([1], [130], [5, 0, 17, 64, 1, 0, 33]):
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        qkv = rng.standard_normal((int(offsets[-1]), 3 * 64), dtype=np.float32)
        one = _native.attention(qkv, num_heads=2, path=path, offsets=offsets)
        two = _native.attention(qkv, num_heads=2, path=path, offsets=offsets, threads=2)
        np.testing.assert_array_equal(one, two)
        q, k, v = np.split(qkv, 3, axis=-1)
        assert_matches(one, packed_reference(q, k, v, offsets, 2), path, f"lengths={lengths}")


@pytest.mark.parametrize(
    "offsets, message",
    [
        ([1, 5, 10], r"offsets\[0\] is 1, not 0"),
        ([0, 6, 4, 10], "not non-decreasing"),
        ([0, 4, 11], "not non-decreasing within \\[0, T=10\\]"),
        ([0, 4, 9], r"offsets\[B=2\]=9 is not the token count T=10"),
        ([0, -3, 10], "not non-decreasing"),
    ],
)
def test_bad_offsets_are_refused_before_any_work(offsets, message):
    qkv = np.zeros((10, 3 * 8), np.float32)
    for path in _native.available_attention_paths():
        with pytest.raises(ValueError, match=message):
            _native.attention(qkv, num_heads=2, path=path, offsets=np.array(offsets, np.int64))


def test_packed_sequence_beyond_limit_is_refused():
    s = _native.ATTENTION_MAX_SEQUENCE + 1
    with pytest.raises(ValueError, match=f"sequence 1 has {s} tokens, beyond the limit"):
        _native.attention(
            np.zeros((s + 2, 3), np.float32), num_heads=1, offsets=np.array([0, 2, s + 2])
        )


def test_packed_takes_no_mask():
    with pytest.raises(ValueError, match="take no attention_bias"):
        _native.attention(
            np.zeros((4, 6), np.float32),
            None,
            None,
            np.zeros((1, 1, 1, 4), np.float32),
            num_heads=1,
            offsets=np.array([0, 4]),
        )


# ------------------------------------------------------------------------------------------
# Inside ORT


def session(model: bytes, threads: int = 1):
    return fastonnx.make_session(model, threads)


def make(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "packed", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(fastonnx.OP_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def packed_encoder_model(d: int, heads: int, mask_type=TensorProto.INT64) -> bytes:
    """x [B, S, 3D] -> PackTokens -> Attention(offsets) -> UnpackTokens -> y [B, S, D];
    the packed tensor and offsets are outputs too."""
    nodes = [
        helper.make_node(
            "PackTokens", ["x", "mask"], ["packed", "offsets"], domain=fastonnx.OP_DOMAIN
        ),
        helper.make_node(
            "Attention",
            ["packed", "", "", "", "offsets"],
            ["attn"],
            domain=fastonnx.OP_DOMAIN,
            num_heads=heads,
        ),
        helper.make_node(
            "UnpackTokens", ["attn", "offsets", "mask"], ["y"], domain=fastonnx.OP_DOMAIN
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 3 * d]),
        helper.make_tensor_value_info("mask", mask_type, ["B", "S"]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d]),
        helper.make_tensor_value_info("packed", TensorProto.FLOAT, ["T", 3 * d]),
        helper.make_tensor_value_info("offsets", TensorProto.INT64, ["B1"]),
    ]
    return make(nodes, inputs, outputs)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mask_type", [TensorProto.INT64, TensorProto.INT32], ids=["i64", "i32"])
def test_ort_pack_attention_unpack(pattern, mask_type):
    b, s, n, h = 3, 19, 2, 32
    mask = attention_mask(pattern, b, s, seed=1)
    x = np.random.default_rng(2).standard_normal((b, s, 3 * n * h), dtype=np.float32)
    feeds = {"x": x, "mask": mask.astype(np.int64 if mask_type == TensorProto.INT64 else np.int32)}
    y, packed, offsets = session(packed_encoder_model(n * h, n, mask_type), 2).run(None, feeds)
    np.testing.assert_array_equal(offsets, offsets_of(mask))
    np.testing.assert_array_equal(packed, pack_reference(x, mask))
    assert y.shape == (b, s, n * h)
    # Padded positions are exactly 0; valid ones are each sequence's own attention.
    assert not y[~mask.astype(bool)].any()
    q, k, v = np.split(pack_reference(x, mask), 3, axis=-1)
    expected = unpack_reference(packed_reference(q, k, v, offsets, n), mask)
    if mask.any():
        assert_matches(y, expected, _native.attention_paths()[-1], pattern)


@pytest.mark.parametrize("isa", _native.all_isas())
def test_forced_isa_runs_packed_attention(isa, monkeypatch):
    monkeypatch.setenv("FASTONNX_ISA", isa)
    path = attention_path_for_isa(isa, _native.cpu_features()["vendor"])
    reason = _native.isa_unavailable_reason(isa) or _native.attention_path_unavailable_reason(path)
    if reason:
        pytest.skip(f"FASTONNX_ISA={isa}: {reason}")
    b, s, n, h = 4, 23, 2, 32
    mask = attention_mask("holes", b, s, seed=4)
    x = np.random.default_rng(3).standard_normal((b, s, 3 * n * h), dtype=np.float32)
    y, packed, offsets = session(packed_encoder_model(n * h, n)).run(None, {"x": x, "mask": mask})
    expected = _native.attention(packed, num_heads=n, path=path, offsets=offsets)
    np.testing.assert_array_equal(y[mask.astype(bool)], expected)


def unpack_model(offsets_type=TensorProto.INT64) -> bytes:
    node = helper.make_node(
        "UnpackTokens", ["packed", "offsets", "mask"], ["y"], domain=fastonnx.OP_DOMAIN
    )
    inputs = [
        helper.make_tensor_value_info("packed", TensorProto.FLOAT, ["T", "D"]),
        helper.make_tensor_value_info("offsets", offsets_type, ["B1"]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]),
    ]
    return make([node], inputs, [helper.make_tensor_value_info("y", 1, ["B", "S", "D"])])


def run_bad(model: bytes, feeds) -> str:
    with pytest.raises(Exception) as info:
        session(model).run(None, feeds)
    text = str(info.value)
    assert "INVALID_ARGUMENT" in text, text
    return text


def test_ort_unpack_refuses_offsets_inconsistent_with_the_mask():
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    packed = np.ones((3, 4), np.float32)
    cases = [
        (np.array([0, 1, 3]), r"offsets are inconsistent with the mask: offsets\[1\]=1"),
        (np.array([0, 2, 3, 3]), r"offsets must be \[B \+ 1\] = \[3\]"),
        (np.array([1, 2, 3]), r"offsets\[0\] is 1, not 0"),
        (np.array([0, 2, 4]), r"offsets\[2\]=4 but the mask's sequences 0..1 hold 3 tokens"),
    ]
    for offsets, message in cases:
        feeds = {"packed": packed, "offsets": offsets.astype(np.int64), "mask": mask}
        text = run_bad(unpack_model(), feeds)
        assert re.search(message, text), text
    feeds = {"packed": packed[:2], "offsets": np.array([0, 2, 3]), "mask": mask}
    assert "the mask holds 3 tokens but the packed tensor has T=2" in run_bad(unpack_model(), feeds)


@pytest.mark.parametrize("bad_value", [2, -1])
def test_ort_mask_not_zero_or_one_is_refused(bad_value):
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    mask[1, 2] = bad_value
    x = np.zeros((2, 3, 3 * 8), np.float32)
    text = run_bad(packed_encoder_model(8, 2), {"x": x, "mask": mask})
    assert f"PackTokens: attention_mask[1,2] is {bad_value}" in text, text
    feeds = {"packed": np.zeros((3, 8), np.float32), "offsets": np.array([0, 2, 3]), "mask": mask}
    text = run_bad(unpack_model(), feeds)
    assert f"attention_mask[1,2] is {bad_value}, not 0 or 1" in text, text


def test_ort_pack_shape_errors_name_the_shapes():
    x = np.zeros((2, 4, 24), np.float32)
    text = run_bad(packed_encoder_model(8, 2), {"x": x, "mask": np.ones((2, 5), np.int64)})
    assert "hidden must be [B, S, D] with the mask's [B, S] = [2,5], got [2,4,24]" in text, text


def test_ort_attention_with_offsets_shape_errors():
    def attention_model(q_shape, with_bias=False) -> bytes:
        names = ["q", "", "", "bias" if with_bias else "", "offsets"]
        node = helper.make_node("Attention", names, ["y"], domain=fastonnx.OP_DOMAIN, num_heads=2)
        inputs = [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, q_shape),
            helper.make_tensor_value_info("offsets", TensorProto.INT64, ["B1"]),
        ]
        if with_bias:
            inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, 1, 4]))
        return make([node], inputs, [helper.make_tensor_value_info("y", 1, None)])

    offsets = np.array([0, 4], np.int64)
    text = run_bad(
        attention_model(["B", "S", 24]), {"q": np.zeros((1, 4, 24), np.float32), "offsets": offsets}
    )
    assert "with offsets (packed tokens) query must be 2-D" in text, text
    feeds = {
        "q": np.zeros((4, 24), np.float32),
        "offsets": offsets,
        "bias": np.zeros((1, 1, 1, 4), np.float32),
    }
    text = run_bad(attention_model(["T", 24], with_bias=True), feeds)
    assert "attention_bias must be absent" in text, text
    feeds = {"q": np.zeros((4, 24), np.float32), "offsets": np.array([0, 5], np.int64)}
    text = run_bad(attention_model(["T", 24]), feeds)
    assert "offsets are not non-decreasing within [0, T=4]" in text, text


def test_random_offsets_and_masks_give_a_result_or_invalid_argument():
    """Hostile offsets/masks (random values, lengths, signs): either the reference result or a
    clear INVALID_ARGUMENT; never a crash or a read outside the tensors."""
    rng = np.random.default_rng(11)
    attention = session(
        make(
            [
                helper.make_node(
                    "Attention",
                    ["q", "", "", "", "offsets"],
                    ["y"],
                    domain=fastonnx.OP_DOMAIN,
                    num_heads=2,
                )
            ],
            [
                helper.make_tensor_value_info("q", TensorProto.FLOAT, ["T", 48]),
                helper.make_tensor_value_info("offsets", TensorProto.INT64, ["B1"]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 16])],
        )
    )
    unpack = session(unpack_model())
    refused = 0
    for _ in range(100):
        t = int(rng.integers(0, 12))
        q = rng.standard_normal((t, 48), dtype=np.float32)
        offsets = np.sort(rng.integers(-2, t + 3, size=int(rng.integers(1, 5))))
        if rng.random() < 0.3:
            offsets = rng.permutation(offsets)
        try:
            (y,) = attention.run(None, {"q": q, "offsets": offsets.astype(np.int64)})
        except Exception as exc:  # noqa: BLE001 - ORT's own exception types
            assert "INVALID_ARGUMENT" in str(exc) and "offsets" in str(exc), str(exc)
            refused += 1
        else:
            qq, kk, vv = np.split(q, 3, axis=-1)
            if t:
                assert_matches(y, packed_reference(qq, kk, vv, offsets, 2), "auto", "random")
        mask = rng.integers(0, 2 if rng.random() < 0.8 else 3, size=(len(offsets) - 1, 4))
        feeds = {"packed": q[:, :16].copy(), "offsets": offsets.astype(np.int64), "mask": mask}
        try:
            (z,) = unpack.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            assert "INVALID_ARGUMENT" in str(exc), str(exc)
        else:
            np.testing.assert_array_equal(z, unpack_reference(q[:, :16], mask))
    assert 0 < refused < 100


def test_ort_packed_attention_with_separate_qkv():
    lengths = [3, 0, 9, 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    t, n, h = int(offsets[-1]), 2, 32
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((t, n * h), dtype=np.float32) for _ in range(3))
    node = helper.make_node(
        "Attention", ["q", "k", "v", "", "offsets"], ["y"], domain=fastonnx.OP_DOMAIN, num_heads=n
    )
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["T", n * h]) for x in "qkv"]
    inputs.append(helper.make_tensor_value_info("offsets", TensorProto.INT32, ["B1"]))
    model = make([node], inputs, [helper.make_tensor_value_info("y", 1, ["T", n * h])])
    feeds = {"q": q, "k": k, "v": v, "offsets": offsets.astype(np.int32)}
    (y,) = session(model, 2).run(None, feeds)
    assert_matches(y, packed_reference(q, k, v, offsets, n), "auto", "separate q/k/v, int32")
    feeds["k"] = k[:-1]
    text = run_bad(model, feeds)
    assert "key has shape" in text and "[T, D]" in text, text
