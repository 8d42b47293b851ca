"""com.fastonnx::Attention: every kernel path against a NumPy reference (through the Python
binding), then inside real ORT sessions (threads, FASTONNX_ISA forcing, bad input).

Dimensions: B batch, S sequence, N heads, H head size, D = N * H.
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

LOWEST = np.finfo(np.float32).min
PATHS = _native.attention_paths()


def reference(q, k, v, mask, num_heads, scale=None, key_scores=False):
    """softmax(Q K^T * scale + mask) V in float64; keys with mask <= -1e30 get weight 0, and a
    row whose keys all have it attends uniformly (docs/operators.md). key_scores: also the
    attention each key receives [B, S], summed over heads and queries (rows whose keys are all
    skipped give none)."""
    b, s, d = q.shape
    h = d // num_heads
    scale = 1 / np.sqrt(h) if scale is None else scale

    def heads(x):
        return x.reshape(b, s, num_heads, h).transpose(0, 2, 1, 3).astype(np.float64)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) * scale
    if mask is not None:
        m = np.broadcast_to(mask, scores.shape).astype(np.float64)
        # The sum is rounded to float32 as the model's fp32 graph rounds it (with a -1e4 fill,
        # that rounding is the largest error there is).
        biased = (scores.astype(np.float32) + m.astype(np.float32)).astype(np.float64)
        scores = np.where(m <= -1e30, -np.inf, biased)
    row_max = scores.max(-1, keepdims=True)
    all_skipped = np.isneginf(row_max)
    p = np.where(all_skipped, 1.0, np.exp(scores - np.where(all_skipped, 0, row_max)))
    p /= p.sum(-1, keepdims=True)
    y = (p @ heads(v)).transpose(0, 2, 1, 3).reshape(b, s, d)
    if key_scores:
        return y, np.where(all_skipped, 0.0, p).sum(axis=(1, 2))
    return y


def padding_mask(b, s, lengths, *, left=False, fill=LOWEST):
    """Additive [B, 1, 1, S] key-padding mask: entry i keeps lengths[i] tokens."""
    keep = np.zeros((b, s), bool)
    for i, n in enumerate(lengths):
        if left:
            keep[i, s - n :] = True
        else:
            keep[i, :n] = True
    return np.where(keep, 0.0, fill).astype(np.float32)[:, None, None, :]


def qkv(b, s, d, seed):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, s, d), dtype=np.float32) for _ in range(3))


def skip_unavailable(path):
    reason = _native.attention_path_unavailable_reason(path)
    if reason:
        pytest.skip(f"attention path {path}: {reason}")


def assert_matches(y, expected, path, case, max_err=3e-2):
    assert np.isfinite(y).all(), f"{case}: non-finite output"
    if path == "ref":
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=2e-5, err_msg=case)
        return
    # fp32 products; 2^x is approximated (7.8e-5 relative), and a -1e4 bias costs fp32 digits
    if path in ("avx2_f32", "avx512_f32"):
        np.testing.assert_allclose(y, expected, rtol=1e-3, atol=5e-4, err_msg=case)
        return
    # bf16 products: per-element error ~1e-2 on unit-scale data, direction kept to 1e-4.
    cos = float((y * expected).sum() / (np.linalg.norm(y) * np.linalg.norm(expected)))
    err = float(np.abs(y - expected).max())
    assert cos >= 0.9999 and err <= max_err, f"{case}: cosine {cos:.6f}, max abs error {err:.4f}"


MASKS = ("none", "right", "left", "all_padding_row", "per_query", "per_head")


def make_mask(kind, b, n, s, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [s] + [max(1, s // (i + 2)) for i in range(1, b)]
    if kind == "none":
        return None
    if kind == "right":
        return padding_mask(b, s, lengths)
    if kind == "left":
        return padding_mask(b, s, lengths, left=True, fill=-np.inf)
    if kind == "all_padding_row":
        return padding_mask(b, s, [s] + [0] * (b - 1))
    if kind == "per_query":  # [B, 1, S, S]: causal-like plus padding, finite biases elsewhere
        m = rng.standard_normal((b, 1, s, s)).astype(np.float32)
        m = np.where(np.tril(np.ones((s, s), bool)), m, LOWEST)
        m[-1, :, : s // 2, :] = -np.inf  # some rows with every key skipped
        return m.astype(np.float32)
    if kind == "per_head":  # [1, N, 1, S]
        m = np.zeros((1, n, 1, s), np.float32)
        m[0, 0, 0, s // 3 :] = LOWEST
        return m
    raise ValueError(kind)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("s", [1, 7, 64, 129, 384])
@pytest.mark.parametrize("h", [32, 64])
def test_paths_match_reference(path, s, h):
    skip_unavailable(path)
    b, n = 2, 2
    q, k, v = qkv(b, s, n * h, seed=s + h)
    for kind in MASKS:
        mask = make_mask(kind, b, n, s)
        y = _native.attention(q, k, v, mask, num_heads=n, path=path)
        case = f"path={path} B={b} S={s} N={n} H={h} mask={kind}"
        assert_matches(y, reference(q, k, v, mask, n), path, case)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("s", [1, 7, 64, 129])
def test_key_scores_match_reference(path, s):
    skip_unavailable(path)
    b, n, h = 3, 2, 32
    q, k, v = qkv(b, s, n * h, seed=s)
    for kind in MASKS:
        mask = make_mask(kind, b, n, s)
        y, scores = _native.attention(q, k, v, mask, num_heads=n, path=path, key_scores=True)
        expected_y, expected = reference(q, k, v, mask, n, key_scores=True)
        case = f"path={path} S={s} mask={kind}"
        assert_matches(y, expected_y, path, case)  # asking for scores changes nothing else
        assert scores.shape == (b, s) and np.isfinite(scores).all(), case
        # bf16 probabilities: each is within ~0.4% of the fp32 one.
        tol = 1e-5 if path == "ref" else 1e-2
        np.testing.assert_allclose(scores, expected, rtol=tol, atol=tol, err_msg=case)


@pytest.mark.parametrize("path", PATHS)
def test_packed_key_scores_are_per_sequence(path):
    skip_unavailable(path)
    n, h, lengths = 2, 32, [5, 0, 17, 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    q, k, v = (x[0] for x in qkv(1, int(offsets[-1]), n * h, seed=3))
    y, scores = _native.attention(q, k, v, num_heads=n, path=path, offsets=offsets, key_scores=True)
    assert scores.shape == (offsets[-1],)
    for b, n_b in enumerate(lengths):
        rows = slice(offsets[b], offsets[b + 1])
        if n_b == 0:
            continue
        one = [x[None, rows] for x in (q, k, v)]
        _, expected = reference(*one, None, n, key_scores=True)
        tol = 1e-5 if path == "ref" else 1e-2
        np.testing.assert_allclose(scores[rows], expected[0], rtol=tol, atol=tol)
        # Each of the N heads' n_b queries hands out probability 1 over its own sequence.
        assert scores[rows].sum() == pytest.approx(n * n_b, rel=1e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("h", [8, 24, 80])
def test_odd_head_sizes_and_scale(path, h):
    skip_unavailable(path)
    b, s, n = 1, 19, 3
    q, k, v = qkv(b, s, n * h, seed=h)
    mask = padding_mask(b, s, [11])
    y = _native.attention(q, k, v, mask, num_heads=n, scale=0.3, path=path)
    assert_matches(y, reference(q, k, v, mask, n, scale=0.3), path, f"path={path} H={h}")


@pytest.mark.parametrize("path", PATHS)
def test_packed_qkv_equals_separate(path):
    skip_unavailable(path)
    b, s, n, h = 2, 37, 4, 32
    q, k, v = qkv(b, s, n * h, seed=1)
    mask = padding_mask(b, s, [37, 20])
    packed = np.concatenate([q, k, v], axis=-1)
    separate = _native.attention(q, k, v, mask, num_heads=n, path=path)
    np.testing.assert_array_equal(
        _native.attention(packed, mask=mask, num_heads=n, path=path), separate
    )


@pytest.mark.parametrize("path", PATHS)
def test_skipped_keys_are_never_read(path):
    """Padded keys are skipped, not just masked: NaN in their K and V cannot reach the output."""
    skip_unavailable(path)
    b, s, n, h = 2, 40, 2, 32
    q, k, v = qkv(b, s, n * h, seed=2)
    mask = padding_mask(b, s, [40, 25])
    clean = _native.attention(q, k, v, mask, num_heads=n, path=path)
    k[1, 25:], v[1, 25:] = np.nan, np.inf
    np.testing.assert_array_equal(_native.attention(q, k, v, mask, num_heads=n, path=path), clean)


@pytest.mark.parametrize("path", PATHS)
def test_all_padding_row_is_the_mean_of_v(path):
    skip_unavailable(path)
    b, s, n, h = 2, 9, 2, 32
    q, k, v = qkv(b, s, n * h, seed=3)
    for fill in (LOWEST, -np.inf, -1e30):
        mask = padding_mask(b, s, [9, 0], fill=fill)
        y = _native.attention(q, k, v, mask, num_heads=n, path=path)
        np.testing.assert_allclose(y[1], np.broadcast_to(v[1].mean(0), (s, n * h)), atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_finite_fill_above_threshold_is_added_not_skipped(path):
    """Old exporters fill with -10000: that is an ordinary additive bias."""
    skip_unavailable(path)
    b, s, n, h = 2, 12, 2, 32
    q, k, v = qkv(b, s, n * h, seed=4)
    mask = padding_mask(b, s, [12, 0], fill=-1e4)
    y = _native.attention(q, k, v, mask, num_heads=n, path=path)
    assert_matches(y, reference(q, k, v, mask, n), path, f"path={path} fill=-1e4")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gain", [1e-3, 30.0], ids=["tiny_scores", "huge_scores"])
def test_extreme_scores(path, gain):
    """Scores far beyond exp's range (and all-equal ones) keep softmax's invariance to a shift.

    With |scores| ~ 100, bf16's relative rounding of Q moves a score by ~0.3 and softmax, near an
    argmax there, turns that into large changes of single outputs: only the direction is held
    to the bf16 bound then."""
    skip_unavailable(path)
    b, s, n, h = 2, 45, 2, 32
    q, k, v = qkv(b, s, n * h, seed=11)
    q *= gain
    for mask in (None, padding_mask(b, s, [45, 30])):
        y = _native.attention(q, k, v, mask, num_heads=n, path=path)
        case = f"path={path} gain={gain}"
        max_err = 3e-2 if gain < 1 else np.inf
        assert_matches(y, reference(q, k, v, mask, n), path, case, max_err=max_err)


@pytest.mark.parametrize("path", PATHS)
def test_threads_give_identical_results(path):
    skip_unavailable(path)
    q, k, v = qkv(3, 50, 128, seed=5)
    mask = padding_mask(3, 50, [50, 31, 7])
    one = _native.attention(q, k, v, mask, num_heads=4, path=path, threads=1)
    np.testing.assert_array_equal(
        _native.attention(q, k, v, mask, num_heads=4, path=path, threads=2), one
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_heads=5), "num_heads=5 does not divide the hidden size D=64"),
        (dict(num_heads=2, mask=np.zeros((2, 1, 1, 9), np.float32)), r"mask of shape \[2,1,1,9\]"),
        (dict(num_heads=2, mask=np.zeros((1, 3, 1, 10), np.float32)), "does not broadcast"),
        (dict(num_heads=2, path="avx9"), "unknown attention path"),
    ],
)
def test_bad_binding_arguments(kwargs, message):
    q, k, v = qkv(1, 10, 64, seed=6)
    with pytest.raises(ValueError, match=message):
        _native.attention(q, k, v, **kwargs)


def test_sequence_limit():
    s = _native.ATTENTION_MAX_SEQUENCE + 1
    q = np.zeros((1, s, 3), np.float32)
    with pytest.raises(ValueError, match=f"sequence length {s} exceeds the limit"):
        _native.attention(q, num_heads=1)


# ------------------------------------------------------------------------------------------
# Inside ORT


def build_model(
    *,
    num_heads,
    d,
    packed=False,
    mask_shape=None,
    mask_type=TensorProto.FLOAT,
    scale=None,
    q_last=None,
):
    """One Attention node over q/k/v [B, S, D] (or packed [B, S, 3D]) with symbolic B and S
    (``q_last`` overrides q's declared last dimension)."""
    q_dim = q_last or (3 * d if packed else d)
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", "S", q_dim])]
    names = ["q", "", ""]
    if not packed:
        inputs += [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", "S", d]) for x in "kv"]
        names = ["q", "k", "v"]
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", mask_type, mask_shape))
        names.append("mask")
    attrs = {"num_heads": num_heads} if num_heads is not None else {}
    if scale is not None:
        attrs["scale"] = scale
    node = helper.make_node("Attention", names, ["y"], domain=fastonnx.OP_DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        "attention",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(fastonnx.OP_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, threads: int = 1):
    return fastonnx.make_session(model, threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_ort_op_matches_reference(threads, packed):
    b, s, n, h = 2, 129, 4, 32
    q, k, v = qkv(b, s, n * h, seed=7)
    mask = padding_mask(b, s, [129, 50])
    sess = session(
        build_model(num_heads=n, d=n * h, packed=packed, mask_shape=["B", 1, 1, "S"]), threads
    )
    feeds = {"q": np.concatenate([q, k, v], -1)} if packed else {"q": q, "k": k, "v": v}
    (y,) = sess.run(None, {**feeds, "mask": mask})
    assert_matches(
        y, reference(q, k, v, mask, n), _native.attention_paths()[-1], f"threads={threads}"
    )


def test_ort_op_without_mask_and_with_scale():
    b, s, n, h = 1, 16, 2, 64
    q, k, v = qkv(b, s, n * h, seed=8)
    (y,) = session(build_model(num_heads=n, d=n * h, scale=0.05)).run(
        None, {"q": q, "k": k, "v": v}
    )
    assert_matches(y, reference(q, k, v, None, n, scale=0.05), "avx512_bf16", "no mask")


@pytest.mark.parametrize("isa", _native.all_isas())
def test_forced_isa_selects_the_attention_path(isa, monkeypatch):
    """FASTONNX_ISA=ref|avx2 runs the fp32 reference path, avx512_vnni the AVX-512 path this
    CPU runs faster (fp32 on Intel, whose bf16 dot products run at half the fp32 rate; BF16
    elsewhere), amx the AMX-BF16 path."""
    monkeypatch.setenv("FASTONNX_ISA", isa)
    b, s, n, h = 2, 21, 2, 32
    q, k, v = qkv(b, s, n * h, seed=9)
    mask = padding_mask(b, s, [21, 0])
    model = build_model(num_heads=n, d=n * h, mask_shape=[b, 1, 1, s])
    path = attention_path_for_isa(isa, _native.cpu_features()["vendor"])
    reason = _native.isa_unavailable_reason(isa) or _native.attention_path_unavailable_reason(path)
    if reason:
        with pytest.raises(Exception, match="cannot run here"):
            session(model)
        return
    assert _native.attention_kernel_name() == _native.attention_kernel_name(path)
    (y,) = session(model).run(None, {"q": q, "k": k, "v": v, "mask": mask})
    expected = reference(q, k, v, mask, n)
    assert_matches(y, expected, path, f"FASTONNX_ISA={isa}")
    # The session ran the path FASTONNX_ISA selects: same bits as the binding on that path.
    np.testing.assert_array_equal(y, _native.attention(q, k, v, mask, num_heads=n, path=path))


def run_bad(model: bytes, feeds: dict[str, np.ndarray]):
    with pytest.raises(Exception) as info:
        session(model).run(None, feeds)
    return str(info.value)


def test_ort_bad_inputs_are_invalid_argument():
    q, k, v = qkv(1, 10, 64, seed=10)
    feeds = {"q": q, "k": k, "v": v}
    cases = [
        (
            build_model(num_heads=2, d=64, mask_shape=[1, 1, 1, "T"]),
            {**feeds, "mask": np.zeros((1, 1, 1, 9), np.float32)},
            r"mask of shape \[1,1,1,9\] does not broadcast",
        ),
        (
            build_model(num_heads=2, d=64, mask_shape=[1, 1, 1, 10], mask_type=TensorProto.INT64),
            {**feeds, "mask": np.zeros((1, 1, 1, 10), np.int64)},
            "attention_bias must be float32",
        ),
        (
            build_model(num_heads=2, d=64, mask_shape=[1, 10]),
            {**feeds, "mask": np.zeros((1, 10), np.float32)},
            "attention_bias must be 4-D",
        ),
        (build_model(num_heads=3, d=64), feeds, "num_heads=3 does not divide the hidden size D=64"),
        (
            build_model(num_heads=2, d=64, packed=True, q_last="E"),
            {"q": np.zeros((1, 10, 190), np.float32)},
            "last dimension is not 3 \\* D",
        ),
    ]
    for model, bad_feeds, message in cases:
        text = run_bad(model, bad_feeds)
        assert "INVALID_ARGUMENT" in text, text
        assert re.search(message, text), text


def test_ort_sequence_beyond_limit_is_invalid_argument():
    s = _native.ATTENTION_MAX_SEQUENCE + 1
    text = run_bad(
        build_model(num_heads=1, d=1, packed=True), {"q": np.zeros((1, s, 3), np.float32)}
    )
    assert "INVALID_ARGUMENT" in text and f"sequence length {s} exceeds the limit" in text, text


def test_ort_missing_num_heads_fails_session_creation():
    with pytest.raises(Exception, match="num_heads \\(int\\) is required"):
        session(build_model(num_heads=None, d=64))


def test_info_names_the_attention_kernel(capsys):
    from fastonnx.cli import main

    assert main(["info"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "::Attention" in line]
    assert len(lines) == 1 and lines[0].endswith(_native.attention_kernel_name()), lines
