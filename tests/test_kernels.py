"""Every kernel of the manifest against the NumPy reference, called directly through
fastonnx._native.

Kernels this CPU cannot run are skipped with the reason. The AMX kernel also runs as its
emulated twin (the same code on emulated tiles), so its logic is tested on CPUs without AMX;
FASTONNX_ISA / FASTONNX_KERNEL forcing through ORT is covered in test_sparse_linear_op.py.
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
KERNELS = {k["name"]: k for k in _native.kernels()}
BLOCKS = [tuple(b) for b in _native.supported_block_shapes()]
# (M, K, N): tiny, ragged against every width the paths use (4-byte groups, 8/16-row tiles,
# 16-channel tasks, 64-byte AMX tiles, 512-byte K chunks, 384-feature K slices), and real
# encoder shapes.
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
    (40, 3077, 24),  # many K slices of the AVX2 path, a ragged last one
    (128, 384, 1152),
]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


@pytest.fixture(params=list(KERNELS))
def kernel(request):
    reason = KERNELS[request.param]["unavailable_reason"]
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    return request.param


def make_case(m, k, n, sparsity, block, seed=0):
    rng = np.random.default_rng(seed)
    w = block_sparse_weight(n, k, sparsity, block, rng)
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32) * 2
    return rng, w, scale, x


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparse{s:.0%}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}".format(*s))
def test_exact_int32_accumulation(kernel, shape, sparsity, block):
    m, k, n = shape
    rng, w, scale, _ = make_case(m, k, n, sparsity, block)
    xq = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    lin = _native.Linear(_native.pack_weight(w, scale, block), kernel=kernel)
    acc = lin.accumulate(xq)
    expected = xq.astype(np.int64) @ w.astype(np.int64).T
    bad = np.argwhere(acc != expected)
    assert bad.size == 0, (
        f"{lin.name}: {len(bad)} wrong accumulators, first at (m, n)={tuple(bad[0])} "
        f"(kernel={kernel}, M={m}, K={k}, N={n}, sparsity={sparsity}, block={block})"
    )


@pytest.mark.parametrize("k", [16, 64, 200, 390])
def test_quantized_bytes_are_the_reference_bytes(kernel, k):
    """Through an identity weight the output gives back each quantized byte exactly: every one
    equals the reference's, rounding ties (to even) and both ends of the range included."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((21, k)) * 3).astype(np.float32)
    x[0, :2] = [0.0, 255.0]  # scale 1, zero point 0: the values below are exact ties
    x[0, 2:] = rng.integers(0, 255, k - 2) + 0.5
    x[1] = np.linspace(-7.0, 0.0, k)  # all negative: zero point 255
    x[2] = np.linspace(0.0, 5.0, k)  # all positive: zero point 0
    lin = _native.Linear(
        _native.pack_weight(np.eye(k, dtype=np.int8), np.ones(k, np.float32), (1, 4)),
        kernel=kernel,
    )
    q, qs, qz = quantize_rows(x)
    got = np.rint(lin(x) / qs) + qz
    bad = np.argwhere(got != q)
    assert bad.size == 0, (
        f"{kernel}: byte {tuple(bad[0])} is {got[tuple(bad[0])]}, not {q[tuple(bad[0])]}"
    )


@pytest.mark.parametrize("sparsity", [0.0, 0.8], ids=lambda s: f"sparse{s:.0%}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}".format(*s))
def test_float_output_dynamic_quantization(kernel, shape, sparsity):
    m, k, n = shape
    rng, w, scale, x = make_case(m, k, n, sparsity, (1, 4))
    bias = rng.standard_normal(n).astype(np.float32)
    residual = rng.standard_normal((m, n)).astype(np.float32)
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    for activation in ("none", "gelu"):
        y = lin(x, bias=bias, residual=residual, activation=activation)
        ref = sparse_linear(x, w, scale, bias, residual=residual, activation=activation)
        assert y.dtype == np.float32 and y.shape == (m, n)
        assert_close(y, ref, f"{kernel} {shape} {sparsity} {activation}")


def test_dynamic_quantization_matches_reference_bits(kernel):
    """The op's own quantization is bit-identical to the reference (checked via a uint8 round
    trip: accumulate() on the reference's quantized X equals what the op computes)."""
    rng, w, scale, x = make_case(37, 99, 21, 0.5, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    q, qs, qz = quantize_rows(x)
    y = lin(x)
    ref = (lin.accumulate(q) - qz * w.astype(np.int64).sum(1)) * (qs * scale)
    assert_close(y, ref, kernel)


def test_static_quantization_and_leading_dims(kernel):
    rng, w, scale, _ = make_case(1, 96, 40, 0.5, (1, 4))
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    y = lin(x, bias=bias, x_scale=0.02, x_zero_point=128)
    assert y.shape == (2, 3, 40)
    assert_close(y, sparse_linear(x, w, scale, bias, x_scale=0.02, x_zero_point=128), kernel)


def test_uint8_input_and_output(kernel):
    rng, w, scale, _ = make_case(1, 64, 48, 0.5, (4, 4))
    xq = rng.integers(0, 256, size=(20, 64), dtype=np.uint8)
    lin = _native.Linear(_native.pack_weight(w, scale, (4, 4)), kernel=kernel)
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
    assert_u8_close(y, ref, kernel)


def test_chained_uint8_equals_float_round_trip(kernel):
    """Op 1 writes uint8; op 2 reads it: the same as dequantizing in between."""
    rng, w1, s1, x = make_case(24, 64, 32, 0.5, (1, 4))
    w2 = block_sparse_weight(16, 32, 0.5, (1, 4), rng)
    s2 = np.full(16, 0.01, np.float32)
    l1 = _native.Linear(_native.pack_weight(w1, s1, (1, 4)), kernel=kernel)
    l2 = _native.Linear(_native.pack_weight(w2, s2, (1, 4)), kernel=kernel)
    mid = l1(x, y_scale=0.05, y_zero_point=128)
    y = l2(mid, x_scale=0.05, x_zero_point=128)
    deq = (mid.astype(np.float32) - 128) * np.float32(0.05)
    assert_close(y, sparse_linear(deq, w2, s2, x_scale=0.05, x_zero_point=128), kernel)


def test_threads_give_identical_results(kernel):
    rng, w, scale, x = make_case(200, 384, 300, 0.8, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    np.testing.assert_array_equal(lin(x, threads=1), lin(x, threads=2))
    np.testing.assert_array_equal(lin(x, threads=1), lin(x, threads=7))


@pytest.mark.parametrize("m", [1, 47, 64, 65, 130, 301])
def test_blocks_prepared_on_demand_under_threads(kernel, m):
    """A call is one parallel section: the first task to need a row block quantizes and lays it
    out while the others wait on it. More threads than blocks, ragged blocks and repeated calls
    must all give the single-thread result (a race shows up as a mismatch or a hang)."""
    rng, w, scale, x = make_case(m, 100, 70, 0.7, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    bias = rng.standard_normal(70).astype(np.float32)
    expected = lin(x, bias=bias, activation="gelu", threads=1)
    assert_close(expected, sparse_linear(x, w, scale, bias=bias, activation="gelu"), kernel)
    for threads in (2, 3, 8):
        for _ in range(3):
            np.testing.assert_array_equal(
                lin(x, bias=bias, activation="gelu", threads=threads), expected
            )


def test_zero_rows_and_extreme_inputs(kernel):
    rng, w, scale, _ = make_case(1, 40, 24, 0.5, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    assert lin(np.zeros((0, 40), np.float32)).shape == (0, 24)
    x = np.zeros((3, 40), np.float32)  # all-zero rows: scale falls back to 1, output = bias
    bias = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(lin(x, bias=bias), np.tile(bias, (3, 1)))
    big = rng.standard_normal((5, 40)).astype(np.float32) * 1e30
    assert_close(lin(big), sparse_linear(big, w, scale), kernel)


@pytest.mark.parametrize("static", [None, 0.02], ids=["dynamic", "static"])
def test_non_finite_rows_give_nan_rows(kernel, static):
    """The kernel itself applies the op's rule: a NaN or infinity anywhere in a row of X (the
    ragged tail included) gives a NaN row of Y and a 0 row of a uint8 Y; other rows are as if
    run alone."""
    rng, w, scale, x = make_case(9, 37, 20, 0.5, (1, 4))
    lin = _native.Linear(_native.pack_weight(w, scale, (1, 4)), kernel=kernel)
    x[1, 36], x[4, 0], x[7, 17] = np.nan, np.inf, -np.inf
    bad, good = [1, 4, 7], [0, 2, 3, 5, 6, 8]
    kw = {} if static is None else {"x_scale": static, "x_zero_point": 128}
    bias = rng.standard_normal(20).astype(np.float32)
    y = lin(x, bias=bias, activation="gelu", **kw)
    assert np.isnan(y[bad]).all()
    np.testing.assert_array_equal(
        y[good], lin(np.ascontiguousarray(x[good]), bias=bias, activation="gelu", **kw)
    )
    yq = lin(x, bias=bias, y_scale=0.01, y_zero_point=200, **kw)
    assert not yq[bad].any() and yq[good].any()


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


def test_manifest_is_consistent():
    names = [k["name"] for k in _native.kernels()]
    assert len(names) == len(set(names))
    for isa in ALL_ISAS:  # every path has a real kernel, and only real ones are chosen
        assert any(k["isa"] == isa and not k["emulated"] for k in KERNELS.values()), isa
    for k in KERNELS.values():
        assert k["name"].endswith(k["isa"]) or k["emulated"], k["name"]
        assert tuple(k["block_shape"]) in BLOCKS
    blob = _native.pack_weight(np.ones((4, 4), np.int8), np.ones(4, np.float32), (1, 4))
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        _native.Linear(blob, kernel="nope")
    with pytest.raises(ValueError, match="either isa or kernel"):
        _native.Linear(blob, "ref", kernel="s8u8_dense__ref")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0], ids=lambda s: f"sparse{s:.0%}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
def test_weight_stats_count_blocks(block, sparsity):
    """The statistics dispatch reads, against counts made with NumPy on the dense weight."""
    rng = np.random.default_rng(3)
    n, k = 50, 70
    w = block_sparse_weight(n, k, sparsity, block, rng)
    s = _native.weight_stats(_native.pack_weight(w, np.ones(n, np.float32), block))
    wp = np.zeros((-(-n // 16) * 16, -(-k // 4) * 4), np.int8)
    wp[:n, :k] = w
    groups = (wp.reshape(wp.shape[0], -1, 4) != 0).any(axis=2)  # [N, K/4]
    strips = groups.reshape(-1, 16, groups.shape[1]).any(axis=1)  # [N/16, K/4]
    quads = groups.reshape(-1, 4, groups.shape[1]).any(axis=1)  # [N/4, K/4]
    assert s["groups_1x4"] == groups[:n].sum()
    assert s["blocks_4x4"] == quads.sum()
    assert s["blocks_16x4"] == strips.sum()
    assert s["chunks_16x4"] == sum(-(-int(c) // 16) for c in strips.sum(axis=1))
    assert set(s["cost_us"]) == set(KERNELS)


def test_automatic_choice_is_a_real_kernel_of_this_cpu():
    rng = np.random.default_rng(4)
    for sparsity in (0.0, 0.9):
        w = block_sparse_weight(64, 128, sparsity, tuple(_native.preferred_block_shape()), rng)
        lin = _native.Linear(_native.pack_weight(w, np.ones(64, np.float32), (1, 4)))
        entry = KERNELS[lin.name]
        assert not entry["emulated"] and not entry["unavailable_reason"]


def test_emulated_amx_matches_hardware_amx():
    """Where the CPU has AMX, the emulated twin and the real instructions agree bit for bit."""
    hw = KERNELS["s8u8_spmm_16x4__amx"]
    if hw["unavailable_reason"]:
        pytest.skip(f"s8u8_spmm_16x4__amx: {hw['unavailable_reason']}")
    rng, w, scale, x = make_case(70, 200, 50, 0.7, (16, 4))
    blob = _native.pack_weight(w, scale, (16, 4))
    a = _native.Linear(blob, kernel="s8u8_spmm_16x4__amx")
    b = _native.Linear(blob, kernel="s8u8_spmm_16x4__amx_emulated")
    np.testing.assert_array_equal(a(x, activation="gelu"), b(x, activation="gelu"))
