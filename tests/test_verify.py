"""`--verify` judgements: classifier logits by normalized RMS error, other outputs by cosine."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from fastonnx.verify import TOLERANCES, compare_models, format_verify


def linear_model(w: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, w.shape[1]])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return ir.from_proto(model)


def samples(rng, n=16, k=16):
    """One sentence per sample, as the demo verifies; some with near-zero logits, whose
    2-logit cosine is noise."""
    out = []
    for i in range(n):
        x = rng.standard_normal((1, k)).astype(np.float32)
        out.append({"X": x * (1e-3 if i % 4 == 0 else 1.0)})
    return out


def test_two_logit_classifier_with_int8_sized_error_passes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 2))
    noisy = w + rng.standard_normal(w.shape) * 0.01  # about int8-sized weight error
    result = compare_models(linear_model(w), linear_model(noisy), samples(rng), TOLERANCES["int8"])
    (out,) = result.outputs
    assert out.logits and out.rows == 16
    assert out.min_cosine < 0.99  # the per-sample cosine alone would have failed it
    assert out.nrmse < 0.05 and result.passed
    assert "classifier logits" in format_verify(result) and "ok" in format_verify(result)


def test_wrong_logits_fail():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 2))
    result = compare_models(linear_model(w), linear_model(-w), samples(rng), TOLERANCES["int8"])
    assert not result.passed and result.outputs[0].argmax_agree < 4
    assert "FAIL" in format_verify(result)


def test_wide_outputs_keep_the_cosine_rule():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 64))
    result = compare_models(linear_model(w), linear_model(w), samples(rng), TOLERANCES["fuse"])
    assert not result.outputs[0].logits and result.passed
