"""Every kernel path against the NumPy reference, called directly through fastonnx._native.

Paths this CPU lacks are skipped with the reason; FASTONNX_ISA forcing through ORT is covered in
test_sparse_linear_op.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.kernel_reference import (
    assert_close,
    assert_u8_close,
    block_sparse_weight,
    quantize_rows,
    sparse_linear,
)

_native = pytest.importorskip("fastonnx._native")

ALL_ISAS = _native.all_isas()
BLOCKS = [tuple(b) for b in _native.supported_block_shapes()]
# (M, K, N): tiny, ragged against every width the paths use (4-byte groups, 8/16-row tiles,
# 16-channel tasks, 64-byte AMX tiles, 512-byte K chunks), and real encoder shapes.
SHAPES = [
    (1, 1, 1),
    (1, 4, 1),
    (3, 5, 7),
    (16, 64, 16),
    (17, 65, 33),
    (64, 128, 64),
    (65, 384, 100),
    (130, 200, 48),
    (33, 1030, 20),
    (128, 384, 1152),
]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def isa_or_skip(isa: str) -> str:
    reason = _native.isa_unavailable_reason(isa)
    if reason:
        pytest.skip(f"{isa}: {reason}")
    return isa


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    return isa_or_skip(request.param)


def make_case(m, k, n, sparsity, block, seed=0):
    rng = np.random.default_rng(seed)
    w = block_sparse_weight(n, k, sparsity, block, rng)
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32) * 2
    return rng, w, scale, x


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparse{s:.0%}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}".format(*s))
def test_exact_int32_accumulation(isa, shape, sparsity, block):
    m, k, n = shape
    rng, w, scale, _ = make_case(m, k, n, sparsity, block)
    xq = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    lin = _native.Linear(_native.pack_weight(w, scale, block), isa)
    acc = lin.accumulate(xq)
    expected = xq.astype(np.int64) @ w.astype(np.int64).T
    bad = np.argwhere(acc != expected)
    assert bad.size == 0, (
        f"{lin.name}: {len(bad)} wrong accumulators, first at (m, n)={tuple(bad[0])} "
        f"(isa={isa}, M={m}, K={k}, N={n}, sparsity={sparsity}, block={block})"
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.8], ids=lambda s: f"sparse{s:.0%}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}".format(*s))
def test_float_output_dynamic_quantization(isa, shape, sparsity):
    m, k, n = shape
    rng, w, scale, x = make_case(m, k, n, sparsity, (1, 4))
    bias = rng.standard_normal(n).astype(np.float32)
    residual = rng.standard_normal((m, n)).astype(np.float32)
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), isa)
    for activation in ("none", "gelu"):
        y = lin(x, bias=bias, residual=residual, activation=activation)
        ref = sparse_linear(x, w, scale, bias, residual=residual, activation=activation)
        assert y.dtype == np.float32 and y.shape == (m, n)
        assert_close(y, ref, f"{isa} {shape} {sparsity} {activation}")


def test_dynamic_quantization_matches_reference_bits(isa):
    """The op's own quantization is bit-identical to the reference (checked via a uint8 round
    trip: accumulate() on the reference's quantized X equals what the op computes)."""
    rng, w, scale, x = make_case(37, 99, 21, 0.5, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), isa)
    q, qs, qz = quantize_rows(x)
    y = lin(x)
    ref = (lin.accumulate(q) - qz * w.astype(np.int64).sum(1)) * (qs * scale)
    assert_close(y, ref, isa)


def test_static_quantization_and_leading_dims(isa):
    rng, w, scale, _ = make_case(1, 96, 40, 0.5, (1, 4))
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), isa)
    y = lin(x, bias=bias, x_scale=0.02, x_zero_point=128)
    assert y.shape == (2, 3, 40)
    assert_close(y, sparse_linear(x, w, scale, bias, x_scale=0.02, x_zero_point=128), isa)


def test_uint8_input_and_output(isa):
    rng, w, scale, _ = make_case(1, 64, 48, 0.5, (4, 4))
    xq = rng.integers(0, 256, size=(20, 64), dtype=np.uint8)
    lin = _native.Linear(_native.pack_weight(w, scale, (4, 4)), isa)
    y = lin(xq, x_scale=0.05, x_zero_point=120, activation="gelu", y_scale=0.1, y_zero_point=10)
    assert y.dtype == np.uint8
    ref = sparse_linear(
        xq,
        w,
        scale,
        x_scale=0.05,
        x_zero_point=120,
        activation="gelu",
        y_scale=0.1,
        y_zero_point=10,
    )
    assert_u8_close(y, ref, isa)


def test_chained_uint8_equals_float_round_trip(isa):
    """Op 1 writes uint8; op 2 reads it: the same as dequantizing in between."""
    rng, w1, s1, x = make_case(24, 64, 32, 0.5, (1, 4))
    w2 = block_sparse_weight(16, 32, 0.5, (1, 4), rng)
    s2 = np.full(16, 0.01, np.float32)
    l1 = _native.Linear(_native.pack_weight(w1, s1, (1, 4)), isa)
    l2 = _native.Linear(_native.pack_weight(w2, s2, (1, 4)), isa)
    mid = l1(x, y_scale=0.05, y_zero_point=128)
    y = l2(mid, x_scale=0.05, x_zero_point=128)
    deq = (mid.astype(np.float32) - 128) * np.float32(0.05)
    assert_close(y, sparse_linear(deq, w2, s2, x_scale=0.05, x_zero_point=128), isa)


def test_threads_give_identical_results(isa):
    rng, w, scale, x = make_case(200, 384, 300, 0.8, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), isa)
    np.testing.assert_array_equal(lin(x, threads=1), lin(x, threads=2))
    np.testing.assert_array_equal(lin(x, threads=1), lin(x, threads=7))


def test_zero_rows_and_extreme_inputs(isa):
    rng, w, scale, _ = make_case(1, 40, 24, 0.5, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), isa)
    assert lin(np.zeros((0, 40), np.float32)).shape == (0, 24)
    x = np.zeros((3, 40), np.float32)  # all-zero rows: scale falls back to 1, output = bias
    bias = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(lin(x, bias=bias), np.tile(bias, (3, 1)))
    big = rng.standard_normal((5, 40)).astype(np.float32) * 1e30
    assert_close(lin(big), sparse_linear(big, w, scale), isa)


def test_bad_arguments_raise_clear_errors():
    w = np.ones((8, 16), np.int8)
    blob = _native.pack_weight(w, np.ones(8, np.float32), (1, 4))
    lin = _native.Linear(blob, "ref")
    with pytest.raises(ValueError, match="16 features"):
        lin(np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="bias must have 8"):
        lin(np.zeros((2, 16), np.float32), bias=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="x_scale"):
        lin(np.zeros((2, 16), np.uint8))
    with pytest.raises(ValueError, match="x_scale must be finite"):
        lin(np.zeros((2, 16), np.float32), x_scale=0.0)
    with pytest.raises(ValueError, match="activation"):
        lin(np.zeros((2, 16), np.float32), activation="relu")
    with pytest.raises(ValueError, match="unknown ISA"):
        _native.Linear(blob, "sse9")


def test_unavailable_isa_is_an_error_not_a_crash():
    missing = [i for i in ALL_ISAS if _native.isa_unavailable_reason(i)]
    if not missing:
        pytest.skip("this CPU runs every kernel path")
    blob = _native.pack_weight(np.ones((4, 4), np.int8), np.ones(4, np.float32), (1, 4))
    with pytest.raises(ValueError, match="cannot run here"):
        _native.Linear(blob, missing[-1])


def test_block_shape_preferences_are_supported_shapes():
    assert (1, 4) in BLOCKS
    for isa in ALL_ISAS:
        assert tuple(_native.preferred_block_shape(isa)) in BLOCKS
    assert _native.best_isa() in _native.available_isas()
    assert tuple(_native.preferred_block_shape()) == tuple(
        _native.preferred_block_shape(_native.best_isa())
    )
