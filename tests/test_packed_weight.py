"""The portable packed-weight format: round trips, and every kind of damage is a clear error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.kernel_reference import block_sparse_weight

_native = pytest.importorskip("fastonnx._native")

HEADER = 48
BLOCKS = [tuple(b) for b in _native.supported_block_shapes()]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 130), (64, 64)])
def test_round_trip(shape, block):
    rng = np.random.default_rng(1)
    n, k = shape
    w = block_sparse_weight(n, k, 0.6, block, rng)
    scale = rng.random(n).astype(np.float32)
    blob = _native.pack_weight(w, scale, block)
    w2, scale2, block2 = _native.unpack_weight(blob)
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(scale2, scale)
    assert tuple(block2) == block
    info = _native.weight_info(blob)
    assert (info["n"], info["k"], tuple(info["block_shape"])) == (n, k, block)
    assert info["nbytes"] == len(blob)


def test_sparsity_is_reported_and_saves_space():
    rng = np.random.default_rng(2)
    w = block_sparse_weight(64, 256, 0.9, (1, 4), rng)
    blob = _native.pack_weight(w, np.ones(64, np.float32), (1, 4))
    assert _native.weight_info(blob)["block_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert len(blob) < w.size * 0.4
    dense = _native.pack_weight(np.ones((64, 256), np.int8), np.ones(64, np.float32), (1, 4))
    assert _native.weight_info(dense)["block_sparsity"] == 0


def test_unstructured_sparsity_packs_as_partial_blocks():
    rng = np.random.default_rng(3)
    w = rng.integers(-5, 6, size=(10, 30)).astype(np.int8)  # scattered zeros
    blob = _native.pack_weight(w, np.ones(10, np.float32), (4, 4))
    np.testing.assert_array_equal(_native.unpack_weight(blob)[0], w)


def _blob():
    rng = np.random.default_rng(4)
    w = block_sparse_weight(16, 32, 0.5, (1, 4), rng)
    return bytearray(_native.pack_weight(w, np.ones(16, np.float32), (1, 4)))


def _reseal(blob: bytearray) -> bytearray:
    """Recomputes the checksum (format 2: header with a zeroed checksum field, then payload), to
    test the structural checks behind it."""
    import zlib

    struct.pack_into("<I", blob, 32, 0)
    crc = zlib.crc32(bytes(blob[HEADER:]), zlib.crc32(bytes(blob[:HEADER])))
    struct.pack_into("<I", blob, 32, crc)
    return blob


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:20], "truncated"),
        (lambda b: b[:-4], "truncated or corrupted"),
        (lambda b: b + b"\0\0\0\0", "truncated or corrupted"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + struct.pack("<H", 3) + b[6:], "newer than this fastonnx"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x40]), "checksum"),
        (lambda b: b[:16] + struct.pack("<II", 3, 3) + b[24:], "unsupported block shape"),
        (lambda b: b[:28] + struct.pack("<I", 1) + b[32:], "unknown flags"),
    ],
    ids=["short", "truncated", "trailing", "magic", "version", "crc", "block", "flags"],
)
def test_damaged_blob_is_a_clear_error(damage, message):
    blob = bytes(damage(_blob()))
    with pytest.raises(ValueError, match=message):
        _native.unpack_weight(blob)
    with pytest.raises(ValueError, match=message):
        _native.Linear(blob)


def test_structural_checks_behind_the_checksum():
    blob = _blob()
    n, nnz = 16, _native.weight_info(bytes(blob))["nnz_blocks"]
    col_idx_off = HEADER + 4 * n + 4 * (n + 1)
    bad_col = bytearray(blob)
    struct.pack_into("<I", bad_col, col_idx_off, 10**6)
    with pytest.raises(ValueError, match="column index out of range"):
        _native.unpack_weight(bytes(_reseal(bad_col)))
    bad_ptr = bytearray(blob)
    struct.pack_into("<I", bad_ptr, HEADER + 4 * n + 4 * n, nnz + 5)
    with pytest.raises(ValueError, match="row pointers"):
        _native.unpack_weight(bytes(_reseal(bad_ptr)))
    bad_scale = bytearray(blob)
    struct.pack_into("<f", bad_scale, HEADER, float("nan"))
    with pytest.raises(ValueError, match="scale"):
        _native.unpack_weight(bytes(_reseal(bad_scale)))


def test_pack_rejects_bad_input():
    w = np.ones((4, 8), np.int8)
    with pytest.raises(ValueError, match="unsupported block shape 3x3"):
        _native.pack_weight(w, np.ones(4, np.float32), (3, 3))
    with pytest.raises(ValueError, match="scale"):
        _native.pack_weight(w, np.array([1, np.nan, 1, 1], np.float32), (1, 4))
    with pytest.raises(ValueError, match="scale must be float32"):
        _native.pack_weight(w, np.ones(3, np.float32), (1, 4))
    with pytest.raises(ValueError, match="non-empty"):
        _native.pack_weight(np.ones((0, 8), np.int8), np.ones(0, np.float32), (1, 4))
