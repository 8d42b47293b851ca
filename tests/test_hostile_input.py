"""Hostile and broken input (issue 10): hand-made packed weights, the ORT op's edge cases, and
the native packer's argument checks. Each case ends in its documented outcome (docs/operators.md):
a clear error naming the problem, or a correct result; never a hang, crash or silent wrong number.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from tests.kernel_reference import block_sparse_weight

_native = pytest.importorskip("fastonnx._native")

HEADER = 48
MAX_N = MAX_K = 65536
MAX_ELEMENTS = 1 << 28


def make_blob(
    n,
    k,
    *,
    block=(1, 4),
    nnz=0,
    payload=None,
    version=2,
    flags=0,
    reserved=0,
    payload_bytes=None,
):
    """A blob written field by field (no packer), sealed with a valid checksum, so only the field
    under test is wrong. Without `payload`, an all-zero weight of the given shape (scales 0)."""
    if payload is None:
        block_rows = -(-n // block[0])
        payload = bytes(4 * n) + bytes(4 * (block_rows + 1))
        payload += bytes(-len(payload) % 4)
    size = len(payload) if payload_bytes is None else payload_bytes
    fields = (b"FXSW", version, HEADER, n, k, *block, nnz, flags, 0, reserved, size)
    head = bytearray(struct.pack("<4sHHIIIIIIIIQ", *fields))
    crc = zlib.crc32(payload, zlib.crc32(bytes(head))) if version >= 2 else zlib.crc32(payload)
    struct.pack_into("<I", head, 32, crc)
    return bytes(head) + payload


def reseal(blob: bytes) -> bytes:
    """The same bytes with a recomputed (format 2) checksum."""
    head = bytearray(blob[:HEADER])
    struct.pack_into("<I", head, 32, 0)
    struct.pack_into("<I", head, 32, zlib.crc32(blob[HEADER:], zlib.crc32(bytes(head))))
    return bytes(head) + blob[HEADER:]


def small_blob(seed=0, n=16, k=32):
    rng = np.random.default_rng(seed)
    w = block_sparse_weight(n, k, 0.5, (1, 4), rng)
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    return w, scale, _native.pack_weight(w, scale, (1, 4))


def rejects(blob: bytes, message: str) -> None:
    """The parser and kernel creation (every entry point that reads a blob) refuse it."""
    for read in (_native.weight_info, _native.unpack_weight, _native.Linear):
        with pytest.raises(ValueError, match=message):
            read(blob)


# --------------------------------------------------------------------------------------------
# Packed-weight limits (finding 1, 2): checked before anything is allocated


@pytest.mark.parametrize(
    ("n", "k", "message"),
    [
        (1, 2**32 - 1, "K=4294967295 input features exceeds the limit of 65536"),
        (4, 2**32 - 1, "K=4294967295 input features exceeds the limit"),
        (MAX_N + 1, 4, "N=65537 output channels exceeds the limit of 65536"),
        (2**32 - 1, 1, "N=4294967295 output channels exceeds"),
        (4, MAX_K + 1, "K=65537 input features exceeds"),
        (16384, 16385, "N\\*K=268451840 weights exceeds the limit of 268435456"),
        (0, 8, "non-empty"),
        (8, 0, "non-empty"),
    ],
)
def test_dimensions_beyond_the_limits_are_refused(n, k, message):
    # A 48..60-byte header that claims a huge shape: refused at once (it used to hang or end
    # in std::bad_alloc).
    rejects(make_blob(n, k, payload=bytes(12)), message)


def test_largest_accepted_shape_loads():
    # N*K at its limit with no stored block: a valid (all-zero) weight that creates a kernel.
    blob = make_blob(MAX_N, MAX_ELEMENTS // MAX_N)
    info = _native.weight_info(blob)
    assert (info["n"], info["k"], info["nnz_blocks"]) == (MAX_N, 4096, 0)
    lin = _native.Linear(blob, "ref")
    y = lin(np.ones((1, 4096), np.float32))
    assert y.shape == (1, MAX_N) and not y.any()


def test_pack_time_limits():
    one = np.ones(1, np.float32)
    with pytest.raises(ValueError, match="K=70000 input features exceeds the limit of 65536"):
        _native.pack_weight(np.ones((1, 70000), np.int8), one, (1, 4))
    with pytest.raises(ValueError, match="N=65537 output channels exceeds"):
        _native.pack_weight(
            np.ones((MAX_N + 1, 1), np.int8), np.ones(MAX_N + 1, np.float32), (1, 4)
        )


def _isas():
    return [
        pytest.param(isa, marks=pytest.mark.skipif(bool(why), reason=f"{isa}: {why}"))
        for isa in _native.all_isas()
        for why in [_native.isa_unavailable_reason(isa)]
    ]


@pytest.mark.parametrize("isa", _isas())
def test_accumulation_is_exact_at_the_largest_k(isa):
    # The worst case for int32: K = 65536, activations 255, weights -128 (and +127): the sums
    # reach -2,139,095,040, within int32. One row per extreme, plus a mixed row.
    k, n = MAX_K, 16
    w = np.full((n, k), -128, np.int8)
    w[1::2] = 127
    xq = np.full((3, k), 255, np.uint8)
    xq[2, ::2] = 0
    lin = _native.Linear(_native.pack_weight(w, np.ones(n, np.float32), (1, 4)), isa)
    ref = xq.astype(np.int64) @ w.astype(np.int64).T
    assert np.abs(ref).max() < 2**31
    np.testing.assert_array_equal(lin.accumulate(xq).astype(np.int64), ref, err_msg=lin.name)


# --------------------------------------------------------------------------------------------
# Header fields, checksum, scales, sizes (finding 6)


def test_reserved_and_flags_must_be_zero():
    rejects(make_blob(4, 8, reserved=1), "reserved field is 1 \\(must be 0\\)")
    rejects(make_blob(4, 8, flags=2), "unknown flags 2 \\(must be 0\\)")


def test_checksum_covers_the_header():
    _, _, blob = small_blob()
    # K flipped 32 -> 36: same block-column count and payload, so only the checksum can tell.
    flipped = bytearray(blob)
    struct.pack_into("<I", flipped, 12, 36)
    rejects(bytes(flipped), "checksum mismatch")


def test_version_1_blobs_are_still_read():
    w, scale, blob = small_blob()
    v1 = bytearray(blob)
    struct.pack_into("<H", v1, 4, 1)
    struct.pack_into("<I", v1, 32, zlib.crc32(blob[HEADER:]))  # version 1: payload only
    w1, s1, _ = _native.unpack_weight(bytes(v1))
    np.testing.assert_array_equal(w1, w)
    np.testing.assert_array_equal(s1, scale)
    # ...with the structural checks still behind its weaker checksum.
    struct.pack_into("<I", v1, 28, 1)
    with pytest.raises(ValueError, match="unknown flags"):
        _native.unpack_weight(bytes(v1))


@pytest.mark.parametrize("bad", [-1.0, -0.5e-30, float("nan"), float("inf")])
def test_negative_or_non_finite_scale_is_refused(bad):
    _, _, blob = small_blob()
    damaged = bytearray(blob)
    struct.pack_into("<f", damaged, HEADER + 4 * 3, bad)
    rejects(reseal(bytes(damaged)), "scale\\[3\\] is .* \\(must be finite and >= 0\\)")


def test_wrong_payload_bytes_says_what_differs():
    _, _, blob = small_blob()
    real = len(blob) - HEADER
    head = bytearray(blob[:HEADER])
    struct.pack_into("<Q", head, 40, real + 4)
    rejects(reseal(bytes(head) + blob[HEADER:]), f"payload_bytes={real + 4} but .* need {real}")
    rejects(blob[:-4], f"blob is {len(blob) - 4} bytes, expected {len(blob)}")


def test_more_blocks_than_the_shape_holds():
    rejects(make_blob(4, 8, nnz=9, payload=bytes(64)), "9 stored blocks, more than the 8")


# --------------------------------------------------------------------------------------------
# The ORT op (findings 4, 6, 7)

ort = pytest.importorskip("onnxruntime")
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state  # noqa: E402

from tests.kernel_reference import sparse_linear  # noqa: E402
from tests.test_sparse_linear_op import K, N, build_model, packed, session  # noqa: E402


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("op", ["SparseLinear", "SparseLinearU8"])
@pytest.mark.parametrize("x_shape", [(0, 5, K), (2, 0, K), (0, 0, K)])
def test_empty_batch_gives_an_empty_output(isa, op, x_shape, monkeypatch):
    monkeypatch.setenv("FASTONNX_ISA", isa)
    rng = np.random.default_rng(20)
    y_quant = (0.05, 128) if op == "SparseLinearU8" else None
    sess = session(build_model(packed(rng)[2], op=op, y_quant=y_quant, residual=True))
    x = np.zeros(x_shape, np.float32)
    (y,) = sess.run(None, {"X": x, "R": np.zeros((*x_shape[:2], N), np.float32)})
    assert y.shape == (*x_shape[:2], N)
    assert y.dtype == (np.uint8 if y_quant else np.float32)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("static", [None, (0.02, 128)], ids=["dynamic", "static"])
def test_non_finite_rows_give_nan_rows(isa, static, monkeypatch):
    monkeypatch.setenv("FASTONNX_ISA", isa)
    rng = np.random.default_rng(21)
    w, scale, blob = packed(rng)
    bias = rng.standard_normal(N).astype(np.float32)
    sess = session(build_model(blob, bias=bias, static=static))
    x = rng.standard_normal((1, 6, K)).astype(np.float32)
    x[0, 1, 5] = np.nan
    x[0, 3, K - 1] = np.inf
    x[0, 4, 0] = -np.inf
    (y,) = sess.run(None, {"X": x})
    bad = [1, 3, 4]
    assert np.isnan(y[0, bad]).all(), "a NaN or infinity in a row of X must give a NaN row"
    good = [0, 2, 5]
    assert np.isfinite(y[0, good]).all()
    # The other rows are what the op gives for them alone.
    (y_good,) = sess.run(None, {"X": np.ascontiguousarray(x[:, good])})
    np.testing.assert_array_equal(y[0, good], y_good[0])
    if static is None:
        ref = sparse_linear(x[0, good], w, scale, bias=bias)
        np.testing.assert_allclose(y_good[0], ref, rtol=1e-4, atol=1e-4)


def test_non_finite_rows_give_zero_rows_in_uint8_output():
    rng = np.random.default_rng(22)
    _, _, blob = packed(rng)
    sess = session(build_model(blob, op="SparseLinearU8", y_quant=(0.01, 200)))
    x = rng.standard_normal((1, 3, K)).astype(np.float32)
    x[0, 0, 9] = np.nan
    (y,) = sess.run(None, {"X": x})
    assert not y[0, 0].any()
    assert (y[0, 1:] > 0).any()


@pytest.mark.parametrize(
    ("value", "kind"),
    [(1, "an int"), (1.5, "a float"), ([1, 2], "a list of ints"), ([0.5], "a list of floats")],
)
def test_activation_of_the_wrong_type_is_refused(value, kind):
    rng = np.random.default_rng(23)
    with pytest.raises(ort_state.RuntimeException, match=f"'activation' must be a string.*{kind}"):
        session(build_model(packed(rng)[2], activation=value))


def test_error_codes_at_session_creation_and_at_run_time():
    # ORT reports every kernel-creation failure as RUNTIME_EXCEPTION ("Exception during
    # initialization: <the op's message>"), whatever status the op returns; run-time errors keep
    # the op's INVALID_ARGUMENT. docs/operators.md says so.
    rng = np.random.default_rng(24)
    blob = packed(rng)[2].copy()
    blob[-3] ^= 0x5A
    with pytest.raises(ort_state.RuntimeException, match="initialization: invalid packed weight"):
        session(build_model(blob))
    sess = session(build_model(packed(rng)[2], x_dims=["B", "S", "K"]))
    with pytest.raises(ort_state.InvalidArgument, match="expects 96 input features"):
        sess.run(None, {"X": np.zeros((1, 2, K + 1), np.float32)})


# --------------------------------------------------------------------------------------------
# _native.pack_weight takes exactly int8 weights and float32 scales (finding 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.uint8, bool])
def test_pack_weight_refuses_non_int8_weights(dtype):
    w = np.full((4, 8), 1000 if dtype not in (np.uint8, bool) else 1).astype(dtype)
    with pytest.raises(ValueError, match="w must be int8 \\[N, K\\], got dtype"):
        _native.pack_weight(w, np.ones(4, np.float32), (1, 4))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_pack_weight_refuses_non_float32_scales(dtype):
    with pytest.raises(ValueError, match="scale must be float32 \\[N\\], got dtype"):
        _native.pack_weight(np.ones((4, 8), np.int8), np.ones(4, dtype), (1, 4))


def test_pack_weight_takes_non_contiguous_int8_unchanged():
    rng = np.random.default_rng(30)
    w = rng.integers(-128, 128, (8, 16), dtype=np.int8)
    view = w.T  # Fortran-ordered view of a [16, 8] weight
    w2, _, _ = _native.unpack_weight(_native.pack_weight(view, np.ones(16, np.float32), (1, 4)))
    np.testing.assert_array_equal(w2, view)
