"""Self-attention -> ORT's contrib ``com.microsoft::MultiHeadAttention``.

Dimension letters: B batch, S query sequence, T key/value sequence, N heads, H head size,
D hidden size (D = N * H).

The rule matches everything between the projected query/key/value tensors ([B, S, D] and
[B, T, D]) and the attention output ([B, S, D]): the head split (Reshape + Transpose), the scaled
scores ``Q @ K^T``, the additive mask, Softmax, an optional NaN guard, ``@ V`` and the head merge.
The Q, K and V projections (MatMul + bias Add) stay outside the fused op on purpose: later passes
lower them to sparse INT8 kernels, so their weights and biases must remain separate nodes.

Spellings covered, after :func:`fastonnx.passes.cleanup.cleanup` has normalised shapes:

* the key transposed straight to [B, N, H, T], or to [B, N, T, H] and then swapped;
* scaling of Q, of K^T and/or of the scores, by Mul or Div with a scalar (combined into
  MHA's ``scale``);
* with or without an additive mask, with or without ``Where(IsNaN(p), 0, p)`` after Softmax
  (torch's SDPA decomposition adds it).

The mask is passed as MHA's ``attention_bias``: it is the exporter's own additive mask, so
whatever it encodes (padding from ``attention_mask``, its fill value) is carried exactly. ONNX
Runtime 1.31's CPU kernel accepts ``attention_bias`` of shape [B or 1, N or 1, S, T] and rejects
a broadcast S axis, so a [B, 1, 1, T] padding mask is expanded to [B, 1, S, T] first.
``key_padding_mask`` is not used: it would replace the model's fill value with ORT's own
``mask_filter_value`` and needs the mask traced back to the ``attention_mask`` input.

One difference is deliberate. A query row whose keys are all masked (a batch entry whose
``attention_mask`` is all 0) gets -inf everywhere when the exporter fills the mask with -inf
(torch's SDPA under the legacy exporter does); Softmax then gives NaN, which that exporter's
``Where(IsNaN(p), 0, p)`` turns into 0. MHA has no such guard, so for the NaN-guard variants the
mask is clamped to the lowest finite float first: such rows then attend uniformly, as they do
in transformers' eager attention and in the dynamo exports (which fill with the lowest float),
instead of returning NaN. Rows with at least one visible key are unaffected.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from fastonnx.passes.cleanup import const_ints, const_scalar, same_dim

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the rewrite needs, derived from a match by a pure function (no state on the rule)."""

    num_heads: int
    scale: float
    expand_mask: bool  # the mask's S axis is 1 and must be expanded for ORT's kernel
    clamp_mask: bool  # -inf in the mask must become the lowest finite value (see the docstring)


def _heads_of(target: list[int] | None, x: ir.Value, what: str) -> tuple[int, int] | str:
    """(N, H) of a head-split Reshape of x [B, S, D] to target [0|B, 0|S, N, H]."""
    if target is None:
        return f"{what}: the head-split Reshape target is not a constant (run cleanup first)"
    if len(target) != 4:
        return f"{what}: the head-split Reshape target {target} is not 4-D"
    if x.shape is None or x.shape.rank() != 3:
        return f"{what}: the projected tensor is not known to be 3-D [B, S, D]"
    dims = x.shape.dims
    for axis in (0, 1):
        if target[axis] != 0 and not (isinstance(dims[axis], int) and dims[axis] == target[axis]):
            return f"{what}: Reshape target {target} does not keep axis {axis} of {x.shape}"
    d = dims[2]
    if not isinstance(d, int):
        return f"{what}: hidden size of {x.shape} is not static"
    n, h = target[2], target[3]
    if n == -1 and h > 0 and d % h == 0:
        n = d // h
    elif h == -1 and n > 0 and d % n == 0:
        h = d // n
    if n <= 0 or h <= 0 or n * h != d:
        return f"{what}: Reshape target {target} does not split D={d} into N x H"
    return n, h


def _merge_target_ok(target: list[int] | None, n: int, h: int) -> str | None:
    """Failure reason unless target reshapes [B, S, N, H] to [B, S, N*H]."""
    if target is None:
        return "output: the head-merge Reshape target is not a constant (run cleanup first)"
    if len(target) != 3 or target[0] != 0 or target[1] != 0 or target[2] not in (-1, n * h):
        return f"output: head-merge Reshape target {target} is not [0, 0, {n * h}]"
    return None


def _scale_factor(tag: str | None, value: ir.Value | None, what: str) -> float | str:
    if tag in (None, "None"):
        return 1.0
    scalar = const_scalar(value)
    if scalar is None or scalar == 0.0:
        return f"{what} scaling is not by a non-zero scalar constant"
    return scalar if tag == "Mul" else 1.0 / scalar


def _mask_plan(mask: ir.Value, q_bsd: ir.Value, k_bsd: ir.Value, n: int) -> bool | str:
    """Whether the mask needs its S axis expanded (True/False), or why it cannot be used."""
    if mask.dtype != q_bsd.dtype:
        return f"mask dtype {mask.dtype} differs from the query's {q_bsd.dtype}"
    if mask.shape is None or mask.shape.rank() != 4:
        return f"mask shape {mask.shape} is not 4-D [B|1, N|1, S|1, T]"
    mb, mn, ms, mt = mask.shape.dims
    b, s, t = q_bsd.shape.dims[0], q_bsd.shape.dims[1], k_bsd.shape.dims[1]
    if not (mb == 1 or same_dim(mb, b)):
        return f"mask axis 0 ({mb}) is neither 1 nor the batch size ({b})"
    if mn not in (1, n):
        return f"mask axis 1 ({mn}) is neither 1 nor the number of heads ({n})"
    if not same_dim(mt, t):
        return f"mask axis 3 ({mt}) is not known to equal the key length ({t})"
    if same_dim(ms, s):
        return False
    if ms == 1:
        return True
    return f"mask axis 2 ({ms}) is neither 1 nor the query length ({s})"


class MultiHeadSelfAttention(pattern.RewriteRuleClassBase):
    """One attention block (head split .. head merge) -> com.microsoft::MultiHeadAttention.

    Variants: ``has_mask`` (an additive mask before Softmax), ``nan_guard``
    (``Where(IsNaN(p), 0, p)`` after Softmax).
    """

    def __init__(self, name: str, *, has_mask: bool, nan_guard: bool):
        super().__init__(name)
        self._has_mask = has_mask
        self._nan_guard = nan_guard

    def pattern(
        self,
        op,
        q_bsd,
        k_bsd,
        v_bsd,
        q_target,
        k_target,
        v_target,
        out_target,
        mask,
        q_scale,
        k_scale,
        qk_scale,
        nan_fill,
    ):
        q = op.Transpose(op.Reshape(q_bsd, q_target, _outputs=["q_split"]), perm=[0, 2, 1, 3])
        k_split = op.Reshape(k_bsd, k_target, _outputs=["k_split"])
        k_t = pattern.OrValue(
            [
                op.Transpose(k_split, perm=[0, 2, 3, 1]),
                op.Transpose(op.Transpose(k_split, perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2]),
            ]
        )
        v = op.Transpose(op.Reshape(v_bsd, v_target, _outputs=["v_split"]), perm=[0, 2, 1, 3])

        q = pattern.OrValue(
            [op.Mul(q, q_scale), op.Div(q, q_scale), q],
            tag_var="q_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        k_t = pattern.OrValue(
            [op.Mul(k_t, k_scale), op.Div(k_t, k_scale), k_t],
            tag_var="k_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        scores = op.MatMul(q, k_t)
        scores = pattern.OrValue(
            [op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
            tag_var="qk_scaling",
            tag_values=["Mul", "Div", "None"],
        )
        if self._has_mask:
            scores = op.Add(scores, mask)
        probs = op.Softmax(scores, _outputs=["probs"])
        if self._nan_guard:
            probs = op.Where(op.IsNaN(probs), nan_fill, probs)
        context = op.Transpose(op.MatMul(probs, v), perm=[0, 2, 1, 3])
        return op.Reshape(context, out_target, _outputs=["merged"])

    def _plan(
        self,
        opset: int | None,
        q_bsd,
        k_bsd,
        v_bsd,
        q_target,
        k_target,
        v_target,
        out_target,
        mask,
        probs,
        q_split,
        k_split,
        v_split,
        merged,
        q_scale=None,
        k_scale=None,
        qk_scale=None,
        q_scaling=None,
        k_scaling=None,
        qk_scaling=None,
        nan_fill=None,
        **_,
    ) -> _Plan | tuple[str, object]:
        """The rewrite plan, or (reason, offending node or value) when the match is unusable.

        ``opset`` is the model's default-domain opset, or None once check() has validated it.
        """
        softmax = probs.producer()
        axis_attr = softmax.attributes.get("axis")
        if axis_attr is not None:
            axis = axis_attr.as_int()
        else:
            # Before opset 13 the default axis is 1 and Softmax flattens to 2-D from there.
            axis = -1 if opset is None or opset >= 13 else 1
        if axis not in (-1, 3):
            return f"Softmax axis {axis} is not the last axis", softmax

        if self._nan_guard and const_scalar(nan_fill) != 0.0:
            # Where(IsNaN(p), 0, p) only zeroes rows that are fully masked; another fill value
            # would change the result.
            return "the NaN guard after Softmax does not fill with 0", nan_fill

        for split in (q_split, k_split, v_split, merged):
            allowzero = split.producer().attributes.get("allowzero")
            if allowzero is not None and allowzero.as_int() != 0:
                return "a head split/merge Reshape has allowzero=1", split.producer()

        q_heads = _heads_of(const_ints(q_target), q_bsd, "query")
        if isinstance(q_heads, str):
            return q_heads, q_split.producer()
        k_heads = _heads_of(const_ints(k_target), k_bsd, "key")
        if isinstance(k_heads, str):
            return k_heads, k_split.producer()
        v_heads = _heads_of(const_ints(v_target), v_bsd, "value")
        if isinstance(v_heads, str):
            return v_heads, v_split.producer()
        (n, h), (_, v_h) = q_heads, v_heads
        if k_heads != q_heads or v_heads[0] != n:
            return f"query {q_heads}, key {k_heads}, value {v_heads} (N, H) disagree", q_split
        if v_h != h:
            # ORT's CPU kernel requires the value head size to equal the query's.
            return f"value head size {v_h} differs from query head size {h}", v_split
        if (reason := _merge_target_ok(const_ints(out_target), n, h)) is not None:
            return reason, merged.producer()

        scale = 1.0
        for tag, value, what in (
            (q_scaling, q_scale, "query"),
            (k_scaling, k_scale, "key"),
            (qk_scaling, qk_scale, "score"),
        ):
            factor = _scale_factor(tag, value, what)
            if isinstance(factor, str):
                return factor, value
            scale *= factor

        expand_mask = False
        if self._has_mask:
            mask_plan = _mask_plan(mask, q_bsd, k_bsd, n)
            if isinstance(mask_plan, str):
                return mask_plan, mask
            expand_mask = mask_plan
        return _Plan(
            num_heads=n,
            scale=scale,
            expand_mask=expand_mask,
            clamp_mask=self._has_mask and self._nan_guard,
        )

    def check(self, context, **bindings) -> pattern.MatchResult:
        result = pattern.MatchResult()
        plan = self._plan(context.model.opset_imports.get("", 0), **bindings)
        if isinstance(plan, tuple):
            reason, source = plan
            return result.fail(reason, source if isinstance(source, ir.Node | ir.Value) else None)
        return result

    def rewrite(self, op, q_bsd, k_bsd, v_bsd, mask, **bindings):
        plan = self._plan(None, q_bsd=q_bsd, k_bsd=k_bsd, v_bsd=v_bsd, mask=mask, **bindings)
        if isinstance(plan, tuple):  # check() accepted the same bindings
            raise RuntimeError(f"attention rewrite without a valid plan: {plan[0]}")
        attention_bias = mask if self._has_mask else None
        if plan.clamp_mask:
            lowest = np.finfo(mask.dtype.numpy()).min
            attention_bias = op.Max(mask, op.Constant(value=ir.tensor(lowest, dtype=mask.dtype)))
        if plan.expand_mask:
            one = op.Constant(value_ints=[1])
            seq = op.Shape(q_bsd, start=1, end=2)
            attention_bias = op.Expand(attention_bias, op.Concat(one, one, seq, one, axis=0))
        # A scale equal to MHA's default 1/sqrt(H) is still written: explicit is easier to audit.
        return op.MultiHeadAttention(
            q_bsd,
            k_bsd,
            v_bsd,
            None,  # bias: the projections keep their own bias Add nodes
            None,  # key_padding_mask: see the module docstring
            attention_bias,
            num_heads=plan.num_heads,
            scale=float(plan.scale),
            _domain=MS_DOMAIN,
        )


ATTENTION_RULES = pattern.RewriteRuleSet(
    [
        MultiHeadSelfAttention.rule(
            f"MHA{'_Mask' if has_mask else ''}{'_NanGuard' if nan_guard else ''}",
            has_mask=has_mask,
            nan_guard=nan_guard,
        )
        # Most specific first: a masked block must not be matched as "mask-free" from its Add.
        for has_mask in (True, False)
        for nan_guard in (True, False)
    ]
)


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """The closest match of one attention rule and why it did not fuse."""

    rule: str
    status: str  # "NO_MATCH" (graph shape differs) or "CONDITION_FAILED" (a check failed)
    reason: str
    matched_nodes: int  # how far the pattern got: higher is closer
    at_node: str  # the node where matching started (the head-merge Reshape)
    around: tuple[str, ...]  # names of the nodes/values the failure points at

    def __str__(self) -> str:
        where = f" around {', '.join(self.around)}" if self.around else ""
        return (
            f"{self.rule}: {self.status} after {self.matched_nodes} matched nodes "
            f"(from {self.at_node}): {self.reason or 'no reason given'}{where}"
        )


def explain_attention(model: ir.Model, limit: int = 3) -> list[NearMiss]:
    """Why attention did not fuse: the closest matches, best first. Does not modify the model.

    Run it on the cleaned (or partly fused) model: leftover attention blocks show up here.
    """
    tracer = pattern.MatchingTracer()
    ATTENTION_RULES.apply_to_model(model, tracer=tracer)
    misses = []
    for rule, matches in tracer.best_matches_map.items():
        for info in matches:
            if info.status == pattern.MatchStatus.SUCCESS:
                continue
            result = info.match_result
            misses.append(
                (
                    info.score(),
                    NearMiss(
                        rule=str(rule),
                        status=info.status.name,
                        reason=result.reason,
                        matched_nodes=len(result.nodes),
                        at_node=info.root_node.name or info.root_node.op_type,
                        around=tuple(
                            getattr(x, "name", None) or str(x)
                            for x in result.failure_nodes_and_values
                        ),
                    ),
                )
            )
    misses.sort(key=lambda item: -item[0])
    return [miss for _, miss in misses[:limit]]


def remaining_attention_candidates(model: ir.Model) -> int:
    """Softmax nodes left in the main graph: in an encoder, each is an unfused attention block."""
    return sum(1 for node in model.graph if node.op_type == "Softmax" and node.domain == "")


def fuse_attention(model: ir.Model, *, debug: bool = False) -> int:
    """Fuse self-attention blocks into MultiHeadAttention in place; return how many fused.

    Leftover Softmax nodes are reported with a warning; with ``debug=True`` the closest near
    misses and their failure reasons are logged too (see :func:`explain_attention`).
    """
    count = ATTENTION_RULES.apply_to_model(model)
    left = remaining_attention_candidates(model)
    if left:
        logger.warning(
            "attention: fused %d block(s); %d Softmax node(s) left unfused%s",
            count,
            left,
            "" if debug else " (pass debug=True or call explain_attention(model) for reasons)",
        )
        if debug:
            misses = explain_attention(model)
            for miss in misses:
                logger.warning("attention near miss: %s", miss)
            if not misses:
                logger.warning("attention: no partial match; no block resembles the pattern")
    return count
