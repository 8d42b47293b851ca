"""com.fastonnx::SparseLinear / SparseLinearU8 inside real ORT sessions, loaded through
fastonnx.get_library_path(): numerics, threads, FASTONNX_ISA forcing and bad input."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.kernel_reference import assert_close, assert_u8_close, block_sparse_weight, sparse_linear

_native = pytest.importorskip("fastonnx._native")
ort = pytest.importorskip("onnxruntime")

import fastonnx  # noqa: E402

K, N = 96, 40


def packed(rng, sparsity=0.7, block=(1, 4), n=N, k=K):
    w = block_sparse_weight(n, k, sparsity, block, rng)
    scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    return w, scale, np.frombuffer(_native.pack_weight(w, scale, block), np.uint8)


def build_model(
    blob,
    *,
    op="SparseLinear",
    x_type=TensorProto.FLOAT,
    bias=None,
    static=None,
    residual=False,
    y_quant=None,
    activation=None,
    w_as_input=False,
    n=N,
    k=K,
    x_dims=None,
):
    """One SparseLinear node; X is [B, S, K] with symbolic B and S (or `x_dims`)."""
    inits = [] if w_as_input else [numpy_helper.from_array(blob, "W")]
    inputs = [helper.make_tensor_value_info("X", x_type, x_dims or ["B", "S", k])]
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.UINT8, [len(blob)]))
    names = ["X", "W", "", "", "", ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names[2] = "bias"
    if static is not None:
        inits += [
            numpy_helper.from_array(np.array(static[0], np.float32), "x_scale"),
            numpy_helper.from_array(np.array(static[1], np.uint8), "x_zp"),
        ]
        names[3:5] = ["x_scale", "x_zp"]
    if residual:
        inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, ["B", "S", n]))
        names[5] = "R"
    if y_quant is not None:
        inits += [
            numpy_helper.from_array(np.array(y_quant[0], np.float32), "y_scale"),
            numpy_helper.from_array(np.array(y_quant[1], np.uint8), "y_zp"),
        ]
        names += ["y_scale", "y_zp"]
    while names and names[-1] == "":
        names.pop()
    attrs = {} if activation is None else {"activation": activation}
    node = helper.make_node(op, names, ["Y"], domain=fastonnx.OP_DOMAIN, **attrs)
    y_type = TensorProto.UINT8 if op == "SparseLinearU8" else TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "t", inputs, [helper.make_tensor_value_info("Y", y_type, ["B", "S", n])], inits
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(fastonnx.OP_DOMAIN, 1)],
    )
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, threads: int = 1):
    return fastonnx.make_session(model, intra_op_num_threads=threads)


def test_library_path_and_helpers():
    path = fastonnx.get_library_path()
    assert path.endswith(".so")
    so = fastonnx.session_options(intra_op_num_threads=2)
    assert so.intra_op_num_threads == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_float_op_matches_reference(threads):
    rng = np.random.default_rng(0)
    w, scale, blob = packed(rng)
    bias = rng.standard_normal(N).astype(np.float32)
    sess = session(build_model(blob, bias=bias, residual=True, activation="gelu"), threads)
    x = rng.standard_normal((2, 70, K)).astype(np.float32)
    r = rng.standard_normal((2, 70, N)).astype(np.float32)
    (y,) = sess.run(None, {"X": x, "R": r})
    assert y.shape == (2, 70, N)
    assert_close(y, sparse_linear(x, w, scale, bias, residual=r, activation="gelu"))


def test_static_quantization_and_u8_chain():
    rng = np.random.default_rng(1)
    w, scale, blob = packed(rng)
    x = rng.standard_normal((1, 33, K)).astype(np.float32)
    sess = session(build_model(blob, op="SparseLinearU8", static=(0.03, 128), y_quant=(0.1, 100)))
    (yq,) = sess.run(None, {"X": x})
    assert yq.dtype == np.uint8
    ref = sparse_linear(x, w, scale, x_scale=0.03, x_zero_point=128, y_scale=0.1, y_zero_point=100)
    assert_u8_close(yq, ref)
    # A second op reads the uint8 tensor directly.
    w2, s2, blob2 = packed(rng, n=24, k=N)
    sess2 = session(build_model(blob2, x_type=TensorProto.UINT8, static=(0.1, 100), n=24, k=N))
    (y2,) = sess2.run(None, {"X": yq})
    assert_close(y2, sparse_linear(yq, w2, s2, x_scale=0.1, x_zero_point=100))


def test_one_session_from_many_python_threads():
    rng = np.random.default_rng(2)
    w, scale, blob = packed(rng, sparsity=0.5)
    sess = session(build_model(blob, activation="gelu"), threads=2)
    inputs = [rng.standard_normal((1, 50, K)).astype(np.float32) for _ in range(8)]
    expected = [sess.run(None, {"X": x})[0] for x in inputs]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(t):
        try:
            for rep in range(10):
                i = (t + rep) % len(inputs)
                results[(t, rep)] = (i, sess.run(None, {"X": inputs[i]})[0])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 40
    for i, y in results.values():
        np.testing.assert_array_equal(y, expected[i])


@pytest.mark.parametrize("isa", _native.all_isas())
def test_forced_isa(isa, monkeypatch):
    rng = np.random.default_rng(3)
    w, scale, blob = packed(rng)
    model = build_model(blob, activation="gelu")
    monkeypatch.setenv("FASTONNX_ISA", isa)
    reason = _native.isa_unavailable_reason(isa)
    if reason:
        with pytest.raises(Exception, match="cannot run here"):
            session(model)
        return
    x = rng.standard_normal((1, 19, K)).astype(np.float32)
    (y,) = session(model).run(None, {"X": x})
    assert_close(y, sparse_linear(x, w, scale, activation="gelu"), isa)


@pytest.mark.parametrize("kernel", [k["name"] for k in _native.kernels()])
def test_forced_kernel(kernel, monkeypatch):
    """FASTONNX_KERNEL=<manifest name> runs that kernel inside ORT (or fails clearly)."""
    rng = np.random.default_rng(5)
    w, scale, blob = packed(rng)
    model = build_model(blob, activation="gelu")
    monkeypatch.setenv("FASTONNX_KERNEL", kernel)
    reason = next(k["unavailable_reason"] for k in _native.kernels() if k["name"] == kernel)
    if reason:
        with pytest.raises(Exception, match="cannot run here"):
            session(model)
        return
    x = rng.standard_normal((2, 21, K)).astype(np.float32)
    (y,) = session(model).run(None, {"X": x})
    assert_close(y, sparse_linear(x, w, scale, activation="gelu"), kernel)


def test_unknown_forced_kernel_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTONNX_KERNEL", "s8u8_magic")
    with pytest.raises(Exception, match="FASTONNX_KERNEL=s8u8_magic is not a fastonnx kernel"):
        session(build_model(packed(np.random.default_rng(6))[2]))


def test_unknown_forced_isa_is_an_error(monkeypatch):
    rng = np.random.default_rng(4)
    monkeypatch.setenv("FASTONNX_ISA", "sse9")
    with pytest.raises(Exception, match="FASTONNX_ISA=sse9 is not one of"):
        session(build_model(packed(rng)[2]))


def _corrupt(blob: np.ndarray, how: str) -> np.ndarray:
    b = bytearray(blob.tobytes())
    if how == "truncated":
        b = b[: len(b) // 2]
    elif how == "corrupted":
        b[-3] ^= 0x5A
    elif how == "newer":
        b[4] = 9
    return np.frombuffer(bytes(b), np.uint8)


@pytest.mark.parametrize(
    ("how", "message"),
    [("truncated", "truncated"), ("corrupted", "checksum"), ("newer", "format version 9 is newer")],
)
def test_bad_blob_fails_session_creation_cleanly(how, message):
    rng = np.random.default_rng(5)
    blob = _corrupt(packed(rng)[2], how)
    with pytest.raises(Exception, match=message):
        session(build_model(blob))


def test_weight_must_be_constant():
    rng = np.random.default_rng(6)
    with pytest.raises(Exception, match="must be a constant initializer"):
        session(build_model(packed(rng)[2], w_as_input=True))


def test_bad_activation_attribute():
    rng = np.random.default_rng(7)
    with pytest.raises(Exception, match="activation='relu'"):
        session(build_model(packed(rng)[2], activation="relu"))


def test_run_time_shape_and_type_errors():
    rng = np.random.default_rng(8)
    _, _, blob = packed(rng)
    # Symbolic feature dimension, so the op's own check (not ORT's graph check) sees bad shapes.
    sess = session(build_model(blob, residual=True, x_dims=["B", "S", "K"]))
    with pytest.raises(Exception, match=r"X has shape \[1,5,95\].*expects 96 input features"):
        sess.run(
            None, {"X": np.zeros((1, 5, 95), np.float32), "R": np.zeros((1, 5, N), np.float32)}
        )
    with pytest.raises(Exception, match=r"residual must be float32 with the output's shape"):
        sess.run(None, {"X": np.zeros((1, 5, K), np.float32), "R": np.zeros((1, 4, N), np.float32)})
    int_model = build_model(blob, x_type=TensorProto.INT32)
    with pytest.raises(Exception, match="X must be float32 or uint8"):
        session(int_model).run(None, {"X": np.zeros((1, 2, K), np.int32)})
    u8_model = build_model(blob, x_type=TensorProto.UINT8)
    with pytest.raises(Exception, match="uint8 X needs x_scale"):
        session(u8_model).run(None, {"X": np.zeros((1, 2, K), np.uint8)})


def test_bias_shape_error():
    rng = np.random.default_rng(9)
    _, _, blob = packed(rng)
    sess = session(build_model(blob, bias=np.zeros(N + 1, np.float32)))
    with pytest.raises(Exception, match="bias must be float32 with 40 elements"):
        sess.run(None, {"X": np.zeros((1, 2, K), np.float32)})


def test_models_check_with_onnx_checker():
    rng = np.random.default_rng(10)
    onnx.checker.check_model(
        onnx.load_from_string(build_model(packed(rng)[2], bias=np.zeros(N, np.float32)))
    )
