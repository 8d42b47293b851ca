"""NumPy reference of the sparse INT8 linear op (docs/operators.md) and test-weight builders.

Dimensions: M rows, K input features, N output features.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def block_sparse_weight(n: int, k: int, sparsity: float, block: tuple[int, int], rng) -> np.ndarray:
    """int8 W [N, K] with exactly round(sparsity * blocks) all-zero blocks; kept values non-zero."""
    br, bc = block
    rows, cols = -(-n // br), -(-k // bc)
    keep = np.ones(rows * cols, dtype=bool)
    keep[rng.permutation(rows * cols)[: int(round(sparsity * rows * cols))]] = False
    mask = np.kron(keep.reshape(rows, cols), np.ones(block, dtype=bool))[:n, :k]
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    w[w == 0] = 1
    return np.where(mask, w, 0).astype(np.int8)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic per-row uint8 quantization: (q [M, K], scale [M, 1], zero_point [M, 1])."""
    x = x.astype(np.float32)
    lo = np.minimum(x.min(axis=1, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis=1, keepdims=True), np.float32(0))
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[scale == 0] = 1
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(np.float32)
    return quantize(x, scale, zp), scale, zp


def quantize(x: np.ndarray, scale, zero_point) -> np.ndarray:
    inv = (np.float32(1) / np.asarray(scale, dtype=np.float32)).astype(np.float32)
    q = np.rint((x.astype(np.float32) * inv).astype(np.float32)) + np.float32(zero_point)
    return np.clip(q, 0, 255).astype(np.uint8)


def gelu(y: np.ndarray) -> np.ndarray:
    return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))


def sparse_linear(
    x: np.ndarray,
    w: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    x_scale: float | None = None,
    x_zero_point: int = 0,
    residual: np.ndarray | None = None,
    activation: str = "none",
    y_scale: float | None = None,
    y_zero_point: int = 0,
) -> np.ndarray:
    """Y = act(dequant(quant(X) @ W^T) + bias) + residual, in float64 after exact integer math."""
    k = w.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.dtype == np.uint8:
        q, scale, zp = x2, np.float32(x_scale), np.float32(x_zero_point)
    elif x_scale is not None:
        q, scale, zp = (
            quantize(x2, x_scale, x_zero_point),
            np.float32(x_scale),
            np.float32(x_zero_point),
        )
    else:
        q, scale, zp = quantize_rows(x2)
    wi = w.astype(np.int64)
    acc = q.astype(np.int64) @ wi.T
    deq = (acc - zp.astype(np.int64) * wi.sum(axis=1)) * (
        np.asarray(scale, np.float64) * w_scale.astype(np.float64)
    )
    if bias is not None:
        deq = deq + bias
    if activation == "gelu":
        deq = gelu(deq)
    if residual is not None:
        deq = deq + residual.reshape(deq.shape)
    out = deq.reshape(*lead, w.shape[0])
    if y_scale is not None:
        return quantize(out.astype(np.float32), y_scale, y_zero_point)
    return out


def assert_close(y: np.ndarray, ref: np.ndarray, context: str = "") -> None:
    """Float outputs: |y - ref| <= 1e-5 * max|ref| + 1e-5 (float32 epilogue, erf approximation)."""
    tol = 1e-5 * float(np.abs(ref).max(initial=0.0)) + 1e-5
    err = float(np.abs(y.astype(np.float64) - ref).max(initial=0.0))
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g} ({context})"


def assert_u8_close(y: np.ndarray, ref: np.ndarray, context: str = "") -> None:
    """uint8 outputs: off by at most one step, and rarely (float rounding at ties)."""
    diff = np.abs(y.astype(np.int32) - ref.astype(np.int32))
    assert diff.max(initial=0) <= 1, f"uint8 output off by {diff.max()} ({context})"
    assert (diff > 0).mean() <= 0.01, f"{(diff > 0).mean():.2%} of uint8 outputs differ ({context})"


def attention_path_for_isa(isa: str, vendor: str) -> str:
    """The attention path FASTONNX_ISA=isa selects (attention.h): the AVX-512 level takes fp32
    on Intel (bf16 dot products at half the fp32 rate there), BF16 elsewhere."""
    avx512 = "avx512_f32" if vendor == "GenuineIntel" else "avx512_bf16"
    return {"ref": "ref", "avx2": "avx2_f32", "avx512_vnni": avx512, "amx": "amx_bf16"}[isa]
