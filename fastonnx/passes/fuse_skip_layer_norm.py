"""Residual Add + LayerNormalization -> ``com.microsoft::SkipLayerNormalization``.

Dimension letters: B batch, S sequence, D hidden size.

Reuses onnxscript's ``SkipLayerNormFusion`` rule (``onnxscript.rewriter.ort_fusions``), which
checks that input and skip are both [B, S, D] and gamma/beta/bias are [D]. That check relies on
consistent symbolic dims, which :func:`fastonnx.passes.cleanup.cleanup` provides.

With ``fold_bias=True`` the bias Add of the projection feeding the residual (the attention output
and FFN-down linear layers) moves into the op's ``bias`` input, which saves one element-wise pass.
With ``fold_bias=False`` those biases stay as ``MatMul`` + ``Add`` pairs, for passes that lower
MatMul + bias into one kernel.

An embedding sum whose position term is [1, S, D] (BERT, DistilBERT) is not a skip connection
in this sense and stays a LayerNormalization; RoBERTa gathers position embeddings per token
([B, S, D]), so its embedding LayerNorm does fuse.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.skip_normalization import SkipLayerNormFusion


def skip_layer_norm_rules(*, fold_bias: bool) -> pattern.RewriteRuleSet:
    rules = []
    if fold_bias:
        rules += [
            SkipLayerNormFusion.rule("SkipLayerNorm_PreBias", has_bias=True, bias_pre_add=True),
            SkipLayerNormFusion.rule("SkipLayerNorm_PostBias", has_bias=True, bias_pre_add=False),
        ]
    rules.append(SkipLayerNormFusion.rule("SkipLayerNorm", has_bias=False))
    # Not commuted (onnxscript cannot commute this rule's untagged OrValue); the legacy exporter's
    # Add(bias, MatMul) order is handled by clean-up, which puts constant operands second.
    return pattern.RewriteRuleSet(rules)


def fuse_skip_layer_norm(model: ir.Model, *, fold_bias: bool = True) -> int:
    """Fuse residual Add + LayerNormalization in place; return how many were fused."""
    return skip_layer_norm_rules(fold_bias=fold_bias).apply_to_model(model)
