"""The ort_int8_range pass: 7-bit weights for ORT int8 layers on CPUs whose ORT int8 GEMM
saturates (x86 without VNNI / AMX), nothing elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastonnx import cpu_flags
from fastonnx.passes.ort_int8_range import reduce_ort_int8_range
from fastonnx.passes.quantize_qdq import quantize_qdq
from tests.test_quantize import _model, cosine, run


def _linear(w: np.ndarray, *, gemm: bool = False, shared: bool = False):
    """x [M, K] -> MatMul(x, w) (or Gemm with transB=1 and w given as [N, K]); ``shared``: a
    second MatMul reads the same weight."""
    k = w.shape[1] if gemm else w.shape[0]
    n = w.shape[0] if gemm else w.shape[1]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y2"], name="fc2"))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["M", n]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        outputs,
        [numpy_helper.from_array(w, "w")],
    )


def _weights(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """int8 initializer name -> (values, scale), from the weight DequantizeLinear nodes."""
    out = {}
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            q = node.inputs[0].const_value.numpy()
            if q.dtype == np.int8:
                out[node.inputs[0].name] = (q, node.inputs[1].const_value.numpy())
    return out


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-transB"])
def test_weights_become_7_bit_and_stay_close(gemm):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (24, 40) if gemm else (40, 24)).astype(np.float32)
    w[:, 3 if not gemm else 0] = 0  # an all-zero channel (MatMul) / input feature (Gemm)
    model = _linear(w, gemm=gemm)
    samples = [{"x": rng.normal(0, 1, (5, 40)).astype(np.float32)} for _ in range(3)]
    quantize_qdq(model, samples)
    ((name, (q8, s8)),) = _weights(model).items()
    report = reduce_ort_int8_range(model, saturates=True)
    assert report.reduced == [name] and report.notes
    q7, s7 = _weights(model)[name]
    assert q7.dtype == np.int8 and q7.shape == q8.shape and s7.shape == s8.shape
    assert np.abs(q7).max() == 63
    axis = 0 if gemm else 1
    shape = [1, 1]
    shape[axis] = -1
    before = q8 * s8.reshape(shape)
    after = q7 * s7.reshape(shape)
    assert np.all(np.abs(after - before) <= s7.reshape(shape) / 2 + 1e-7)
    assert np.all(after[q8 == 0] == 0)
    # A second run changes nothing.
    assert not reduce_ort_int8_range(model, saturates=True).reduced


def test_nothing_changes_where_ort_is_exact():
    rng = np.random.default_rng(1)
    model = _linear(rng.normal(0, 0.3, (16, 8)).astype(np.float32))
    quantize_qdq(model, [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)}])
    before = {k: (q.copy(), s.copy()) for k, (q, s) in _weights(model).items()}
    report = reduce_ort_int8_range(model, saturates=False)
    assert not report.changed and not report.reduced
    for name, (q, s) in _weights(model).items():
        assert np.array_equal(q, before[name][0]) and np.array_equal(s, before[name][1])


def test_shared_weight_is_reduced_once():
    rng = np.random.default_rng(2)
    model = _linear(rng.normal(0, 0.3, (16, 8)).astype(np.float32), shared=True)
    quantize_qdq(model, [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)}])
    report = reduce_ort_int8_range(model, saturates=True)
    assert len(report.reduced) == 1
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.name.startswith("w")]
    assert len(dqs) == 2 and all(d.inputs[1] is dqs[0].inputs[1] for d in dqs)
    assert np.abs(dqs[0].inputs[0].const_value.numpy()).max() == 63


@pytest.mark.parametrize(
    ("flags", "machine", "want"),
    [
        (frozenset({"avx2", "fma"}), "x86_64", True),
        (frozenset({"avx2", "avx512f", "avx512_vnni"}), "x86_64", False),
        (frozenset({"avx2", "avx_vnni"}), "x86_64", False),
        (frozenset({"amx_int8", "avx512f"}), "x86_64", False),
        (None, "x86_64", True),  # unreadable flags: assume the worst
        (None, "aarch64", False),
    ],
)
def test_which_cpus_saturate(monkeypatch, flags, machine, want):
    monkeypatch.setattr(cpu_flags, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu_flags.platform, "machine", lambda: machine)
    assert cpu_flags.ort_int8_saturates() is want


def test_ort_is_accurate_after_the_pass_on_this_cpu():
    """Activations at the top of their range against same-sign weights: 8-bit weights make
    every u8*s8 pair sum 255 * 127 * 2, past int16, on a saturating CPU. After the pass ORT's
    output matches float on every CPU."""
    rng = np.random.default_rng(3)
    k, n = 64, 16
    w = np.abs(rng.normal(0, 0.3, (k, n))).astype(np.float32)
    x = rng.uniform(0.9, 1.0, (8, k)).astype(np.float32)
    model = _linear(w)
    quantize_qdq(model, [{"x": x}])
    want = x @ w
    eight_bit = run(model, [{"x": x}])[0]
    reduce_ort_int8_range(model)
    got = run(model, [{"x": x}])[0]
    assert cosine(want, got) > 0.9999
    assert np.allclose(got, want, rtol=0.02)
    if cpu_flags.ort_int8_saturates():
        # The pass is needed here: without it the same model was wrong.
        assert not np.allclose(eight_bit, want, rtol=0.02), np.max(np.abs(eight_bit / want - 1))
