"""Decomposed layer normalization -> ONNX ``LayerNormalization``.

Dimension letters: D is the normalized (last) axis; the leading axes (B batch, S sequence) are
whatever they are.

Exporters that target an opset without ``LayerNormalization`` (before 17), or that decompose it,
write::

    mean = ReduceMean(x, axes=[-1]);  c = x - mean
    var = ReduceMean(c ** 2, axes=[-1]);  y = c / Sqrt(var + eps) * scale (+ bias)

Variants (constructor flags): ``axes_as_input`` (ReduceMean's axes are an input from opset 18,
an attribute before) and ``has_bias``. Inside the pattern, ``c ** 2`` may be ``Pow(c, 2)`` or
``Mul(c, c)`` and the division may be ``Mul(c, Reciprocal(std))``; operand order of Add/Mul is
covered by commuting the rules (clean-up already puts constant operands second).

Below opset 17, ONNX has no ``LayerNormalization``; ONNX Runtime still runs one in the default
domain (it registers it as a contrib op for opsets 1-16), but ``onnx.checker`` will reject it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from fastonnx.passes.cleanup import const_ints, const_scalar

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _reduced_axes(node: ir.Node, axes_as_input: bool) -> list[int] | None:
    if axes_as_input:
        return const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    attr = node.attributes.get("axes")
    return list(attr.as_ints()) if attr is not None else None


class DecomposedLayerNorm(pattern.RewriteRuleClassBase):
    """ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div / Mul (/ Add) -> LayerNorm op."""

    def __init__(self, name: str, *, axes_as_input: bool, has_bias: bool):
        super().__init__(name)
        self._axes_as_input = axes_as_input
        self._has_bias = has_bias

    def pattern(self, op, x, mean_axes, var_axes, exponent, epsilon, scale, bias):
        if self._axes_as_input:
            mean = op.ReduceMean(x, mean_axes, _outputs=["mean"])
        else:
            mean = op.ReduceMean(x, _outputs=["mean"])
        centered = op.Sub(x, mean)
        squared = pattern.OrValue(
            [op.Pow(centered, exponent), op.Mul(centered, centered)],
            tag_var="square",
            tag_values=["Pow", "Mul"],
        )
        if self._axes_as_input:
            variance = op.ReduceMean(squared, var_axes, _outputs=["variance"])
        else:
            variance = op.ReduceMean(squared, _outputs=["variance"])
        std = op.Sqrt(op.Add(variance, epsilon))
        # Tagged, even though the tag is unused: onnxscript cannot commute untagged OrValues.
        normalized = pattern.OrValue(
            [op.Div(centered, std), op.Mul(centered, op.Reciprocal(std))],
            tag_var="division",
            tag_values=["Div", "Reciprocal"],
        )
        scaled = op.Mul(normalized, scale)
        return op.Add(scaled, bias) if self._has_bias else scaled

    def check(
        self, context, x, mean, variance, exponent, epsilon, scale, bias, square, **_
    ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in _FLOAT_TYPES:
            return result.fail(f"input dtype {x.dtype} is not a float type", x)
        if x.shape is None or not isinstance(x.shape.dims[-1], int):
            return result.fail("the normalized (last) axis of the input is not static", x)
        rank, d = x.shape.rank(), x.shape.dims[-1]
        for reduce in (mean.producer(), variance.producer()):
            axes = _reduced_axes(reduce, self._axes_as_input)
            if axes is None or len(axes) != 1 or axes[0] not in (-1, rank - 1):
                return result.fail(f"ReduceMean axes {axes} are not the last axis only", reduce)
            keepdims = reduce.attributes.get("keepdims")
            if keepdims is not None and keepdims.as_int() != 1:
                return result.fail("ReduceMean does not keep dims", reduce)
        if square == "Pow" and const_scalar(exponent) != 2.0:
            return result.fail("the variance does not square the deviation", exponent)
        eps = const_scalar(epsilon)
        if eps is None or eps < 0:
            return result.fail("epsilon is not a non-negative scalar constant", epsilon)
        for name, param in (("scale", scale), ("bias", bias)):
            if name == "bias" and not self._has_bias:
                continue
            if param.shape is None or param.shape.dims != (d,):
                return result.fail(f"{name} shape {param.shape} is not [{d}]", param)
            if param.dtype != x.dtype:
                return result.fail(
                    f"{name} dtype {param.dtype} differs from input {x.dtype}", param
                )
        return result

    def rewrite(self, op, x, epsilon, scale, bias, **_):
        inputs = [x, scale, bias] if self._has_bias else [x, scale]
        return op.LayerNormalization(
            *inputs, axis=-1, epsilon=float(const_scalar(epsilon)), stash_type=1
        )


def _rules(*, has_bias: bool) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            DecomposedLayerNorm.rule(
                f"LayerNorm{'_AxesInput' if axes_as_input else ''}{'_Bias' if has_bias else ''}",
                axes_as_input=axes_as_input,
                has_bias=has_bias,
            )
            for axes_as_input in (False, True)
        ],
        commute=True,
    )


# Two sets applied one after the other: the rewriter visits nodes in graph order, and the
# bias-free pattern (rooted at the scale Mul) would otherwise fire before the bias pattern
# (rooted at the Add after it) is tried, leaving the bias Add outside the fused op.
LAYER_NORM_BIAS_RULES = _rules(has_bias=True)
LAYER_NORM_RULES = _rules(has_bias=False)


def fuse_layer_norm(model: ir.Model) -> int:
    """Fuse decomposed layer normalizations in place; return how many were fused."""
    return LAYER_NORM_BIAS_RULES.apply_to_model(model) + LAYER_NORM_RULES.apply_to_model(model)
