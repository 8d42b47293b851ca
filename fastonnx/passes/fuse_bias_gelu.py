"""Add(x, bias) + Gelu -> ``com.microsoft::BiasGelu``.

Reuses onnxscript's ``BiasGeluFusion`` (``onnxscript.rewriter.ort_fusions``) for both the ONNX
and the com.microsoft ``Gelu``, and adds one check it lacks: the bias must have exactly as many
elements as the input's last axis (ORT's kernel does not broadcast a one-element bias).

This absorbs the bias Add of the FFN-up linear layer: its MatMul then feeds BiasGelu directly.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.bias_gelu import BiasGeluFusion


class BiasGelu(BiasGeluFusion):
    """onnxscript's Add + Gelu -> BiasGelu, plus a bias-length check."""

    def check(self, op, gelu, input, bias, **bindings) -> pattern.MatchResult:
        result = super().check(op, gelu=gelu, input=input, bias=bias, **bindings)
        if not result:
            return result
        last = input.shape.dims[-1] if input.shape is not None and input.shape.rank() else None
        if not isinstance(last, int) or bias.shape is None or bias.shape.dims != (last,):
            return result.fail(f"bias shape {bias.shape} is not [{last}] (input {input.shape})")
        return result


BIAS_GELU_RULES = pattern.RewriteRuleSet(
    [
        *BiasGelu.rule("BiasGelu_onnx", contrib_op=False).commute(),
        *BiasGelu.rule("BiasGelu_contrib", contrib_op=True).commute(),
    ]
)


def fuse_bias_gelu(model: ir.Model) -> int:
    """Fuse Add(x, bias) + Gelu into com.microsoft BiasGelu in place; return how many fused."""
    return BIAS_GELU_RULES.apply_to_model(model)
