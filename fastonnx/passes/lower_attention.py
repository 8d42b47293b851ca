"""Attention lowering: ``com.microsoft::MultiHeadAttention`` -> ``com.fastonnx::Attention``, and
the Q/K/V projections of one block merged into one SparseLinear (packed QKV).

Dimension letters: B batch, S sequence, N heads, H head size, D hidden size (D = N * H).

1. :class:`MhaToAttention` rewrites the self-attention MHA nodes that
   :mod:`fastonnx.passes.fuse_attention` emits. Their mask is the exporter's additive mask, which
   fuse_attention may have clamped (``Max(mask, lowest)``, for its NaN-guard variants) and
   expanded to [B, 1, S, S] (ORT's kernel rejects a broadcast S axis). fastonnx's op needs
   neither: it broadcasts the S axis itself, skips keys at or below -1e30 (-inf included) and
   gives a row whose keys are all skipped the uniform result the clamp gives. So the op reads the
   original [B, 1, 1, S] mask, and the key-padding skip is shared by every query of a row.
2. :func:`merge_qkv` replaces three SparseLinear projections of the same input that feed one
   Attention node with one SparseLinear of N = 3D (weights unpacked, concatenated as
   [W_q; W_k; W_v], repacked with their block shape; biases concatenated) whose [B, S, 3D]
   output the op reads as packed QKV. The three layers quantize the same X per row the same
   way, so the merged layer computes exactly what the three did, in one pass over X.

Every MHA node left, and every Attention node whose projections were not merged, is reported
with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern

from fastonnx.passes.base import Pass, Report, Skip
from fastonnx.passes.cleanup import const_array, const_scalar, same_dim
from fastonnx.runtime import OP_DOMAIN

MS_DOMAIN = "com.microsoft"
SKIP_THRESHOLD = -1e30  # the op skips keys whose mask is at or below this (docs/operators.md)

# MultiHeadAttention's input slots (ORT contrib op).
_QUERY, _KEY, _VALUE, _BIAS, _KEY_PADDING_MASK, _ATTENTION_BIAS = range(6)


@dataclass(frozen=True)
class LoweredAttention:
    node: str
    num_heads: int
    mask: str  # where the op's mask comes from: "none", "as is", or what was looked through


@dataclass(kw_only=True)
class AttentionLoweringReport(Report):
    """Attention nodes lowered; ``skipped``: MultiHeadAttention nodes left on ORT, with the
    reason; ``unmerged_qkv``: lowered blocks whose Q/K/V projections stay three layers."""

    lowered: list[LoweredAttention] = field(default_factory=list)
    merged_qkv: list[str] = field(default_factory=list)  # Attention nodes reading packed QKV
    unmerged_qkv: list[Skip] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {"Attention": len(self.lowered), "QKV projections merged": len(self.merged_qkv)}


@dataclass(frozen=True)
class _Plan:
    num_heads: int
    scale: float | None  # None: the op's default 1/sqrt(H), as MHA's
    mask: ir.Value | None
    mask_note: str


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The ONNX-domain node of ``op_type`` producing value, if that is what produces it."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"):
        return node
    return None


def _look_through_mask(mask: ir.Value, seq: object) -> tuple[ir.Value, str]:
    """The mask before fuse_attention's clamp and Expand, when the op does their work itself:
    a clamp to a constant at or below the skip threshold changes no skip decision and no result,
    and an Expand of a [.., .., .., S] mask is the broadcast the op does."""
    notes, value = [], mask
    while True:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        if node.op_type == "Max" and len(node.inputs) == 2:
            a, b = node.inputs
            if a is not None and (c := const_scalar(b)) is not None and c <= SKIP_THRESHOLD:
                value = a
            elif b is not None and (c := const_scalar(a)) is not None and c <= SKIP_THRESHOLD:
                value = b
            else:
                break
            notes.append("Max clamp")
        elif node.op_type == "Expand" and node.inputs[0] is not None:
            value = node.inputs[0]
            notes.append("Expand")
        else:
            break
    shape = value.shape
    if value is mask or shape is None or shape.rank() != 4 or not same_dim(shape.dims[3], seq):
        return mask, "as is"
    return value, " + ".join(notes) + " looked through"


def plan_attention(node: ir.Node) -> _Plan | str:
    """How to lower one MultiHeadAttention node, or why it cannot be (a pure function)."""
    inputs = list(node.inputs) + [None] * max(0, 6 - len(node.inputs))
    q, k, v = inputs[_QUERY], inputs[_KEY], inputs[_VALUE]
    if inputs[_BIAS] is not None:
        return "MHA has a packed projection bias (fuse_attention never emits one)"
    if inputs[_KEY_PADDING_MASK] is not None:
        return "MHA has a key_padding_mask; fastonnx's Attention takes the additive mask only"
    if any(x is not None for x in inputs[6:]):
        return "MHA has past key/value inputs (a decoder); fastonnx's Attention is self-attention"
    if any(list(out.uses()) or out.is_graph_output() for out in node.outputs[1:]):
        return "MHA's present key/value outputs are used"
    attrs = node.attributes
    if attrs.get_int("unidirectional", 0) != 0:
        return "MHA is unidirectional (causal)"
    num_heads = attrs.get_int("num_heads", 0)
    if num_heads < 1:
        return "MHA has no num_heads"
    if k is None or v is None or q is None:
        return "MHA without separate key and value inputs (packed forms are not rewritten)"
    for value, what in ((q, "query"), (k, "key"), (v, "value")):
        if value.dtype != ir.DataType.FLOAT:
            return f"{what} is {value.dtype}, not float32"
        if value.shape is None or value.shape.rank() != 3:
            return f"{what} is not known to be 3-D [B, S, D]"
    for value, what in ((k, "key"), (v, "value")):
        if not all(same_dim(a, b) for a, b in zip(value.shape.dims, q.shape.dims, strict=True)):
            return (
                f"{what} shape {value.shape} is not known to equal the query's {q.shape} "
                "(fastonnx's Attention is self-attention)"
            )
    d = q.shape.dims[2]
    if isinstance(d, int) and d % num_heads != 0:
        return f"num_heads={num_heads} does not divide D={d}"
    mask, note = inputs[_ATTENTION_BIAS], "none"
    if mask is not None:
        mask, note = _look_through_mask(mask, q.shape.dims[1])
        if mask.dtype != ir.DataType.FLOAT:
            return f"attention_bias is {mask.dtype}, not float32"
        if mask.shape is None or mask.shape.rank() != 4:
            return f"attention_bias shape {mask.shape} is not 4-D [B|1, N|1, S|1, S]"
        mb, mn, ms, mt = mask.shape.dims
        if not same_dim(mt, q.shape.dims[1]):
            return f"attention_bias key axis ({mt}) is not known to equal S ({q.shape.dims[1]})"
        if isinstance(mn, int) and mn not in (1, num_heads):
            return f"attention_bias head axis {mn} is neither 1 nor num_heads={num_heads}"
        if not (ms == 1 or same_dim(ms, q.shape.dims[1])):
            return f"attention_bias query axis ({ms}) is neither 1 nor S"
        if not (mb == 1 or same_dim(mb, q.shape.dims[0])):
            return f"attention_bias batch axis ({mb}) is neither 1 nor B"
    scale_attr = attrs.get("scale")
    scale = None if scale_attr is None else scale_attr.as_float()
    return _Plan(num_heads, scale, mask, note)


class MhaToAttention(pattern.RewriteRuleClassBase):
    """One self-attention MultiHeadAttention node -> com.fastonnx::Attention."""

    def pattern(self, op, q, k, v):
        return op.MultiHeadAttention(
            q, k, v, _domain=MS_DOMAIN, _allow_other_inputs=True, _outputs=["out"]
        )

    def check(self, context, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        plan = plan_attention(out.producer())
        return result.fail(plan, out.producer()) if isinstance(plan, str) else result

    def rewrite(self, op, q, k, v, out, **_):
        plan = plan_attention(out.producer())
        if isinstance(plan, str):  # check() accepted the same node
            raise RuntimeError(f"attention lowering without a valid plan: {plan}")
        attrs = {"num_heads": plan.num_heads}
        if plan.scale is not None:
            attrs["scale"] = float(plan.scale)
        inputs = [q, k, v] + ([plan.mask] if plan.mask is not None else [])
        y = op.Attention(*inputs, _domain=OP_DOMAIN, **attrs)
        y.dtype, y.shape = ir.DataType.FLOAT, q.shape
        return y


ATTENTION_LOWERING_RULES = pattern.RewriteRuleSet([MhaToAttention.rule("MHA_to_Attention")])


# --------------------------------------------------------------------------------------------
# Q/K/V merge


@dataclass(frozen=True)
class _Merge:
    attention: ir.Node
    layers: tuple[ir.Node, ir.Node, ir.Node]
    weights: tuple[tuple[np.ndarray, np.ndarray], ...]  # (W [N, K], scale [N]) per layer
    biases: tuple[np.ndarray | None, ...]
    block: tuple[int, int]


def plan_qkv_merge(attention: ir.Node) -> _Merge | str:
    """The three projections of an Attention node to merge, or why they cannot be."""
    from fastonnx import _native

    q, k, v = (list(attention.inputs) + [None] * 3)[:3]
    if k is None or v is None:
        return "already packed"
    layers = []
    for value, what in ((q, "query"), (k, "key"), (v, "value")):
        node = value.producer()
        if node is None or node.op_type != "SparseLinear" or node.domain != OP_DOMAIN:
            return f"the {what} projection is not a SparseLinear (kept on ORT or not a layer)"
        if len(list(value.uses())) != 1 or value.is_graph_output():
            return f"the {what} projection's output has other uses"
        layers.append(node)
    if len({id(n) for n in layers}) != 3:
        return "query, key and value come from fewer than three layers"

    def slots(node: ir.Node) -> list[ir.Value | None]:
        return (list(node.inputs) + [None] * 6)[:6]

    first = slots(layers[0])
    for node in layers[1:]:
        other = slots(node)
        if other[0] is not first[0]:
            return "the projections read different inputs"
        if other[3] is not first[3] or other[4] is not first[4]:
            return "the projections quantize their input differently (x_scale / x_zero_point)"
    weights, biases, blocks = [], [], set()
    for node in layers:
        s = slots(node)
        if s[5] is not None:
            return f"{node.name} adds a residual"
        if node.attributes.get_string("activation", "none") not in ("none", ""):
            return f"{node.name} has an activation"
        blob = const_array(s[1])
        if blob is None:
            return f"{node.name}'s packed weight is not a constant"
        w, scale, block = _native.unpack_weight(blob)
        weights.append((w, scale))
        blocks.add(tuple(block))
        bias = None if s[2] is None else const_array(s[2])
        if s[2] is not None and bias is None:
            return f"{node.name}'s bias is not a constant"
        biases.append(bias)
    if len({w.shape[1] for w, _ in weights}) != 1:
        return "the projections have different input sizes K"
    if len(blocks) != 1:
        return f"the projections were packed with different block shapes {sorted(blocks)}"
    return _Merge(attention, tuple(layers), tuple(weights), tuple(biases), blocks.pop())


def _apply_merge(graph: ir.Graph, m: _Merge) -> None:
    from fastonnx import _native

    w = np.concatenate([w for w, _ in m.weights])
    scale = np.concatenate([s for _, s in m.weights]).astype(np.float32)
    blob = np.frombuffer(_native.pack_weight(w, scale, m.block), dtype=np.uint8)
    name = (m.attention.name or "attention") + "/qkv"
    packed = ir.Value(name=f"{name}/packed_weight", const_value=ir.tensor(blob))
    graph.register_initializer(packed)
    bias = None
    if any(b is not None for b in m.biases):
        parts = [
            np.zeros(wn.shape[0], np.float32) if b is None else b.reshape(-1).astype(np.float32)
            for b, (wn, _) in zip(m.biases, m.weights, strict=True)
        ]
        bias = ir.Value(name=f"{name}/bias", const_value=ir.tensor(np.concatenate(parts)))
        graph.register_initializer(bias)
    x, _, _, x_scale, x_zp, _ = (list(m.layers[0].inputs) + [None] * 6)[:6]
    inputs = [x, packed, bias, x_scale, x_zp]
    while inputs[-1] is None:
        inputs.pop()
    linear = ir.node("SparseLinear", inputs, domain=OP_DOMAIN, name=f"{name}/sparse")
    qkv = linear.outputs[0]
    qkv.name, qkv.dtype = f"{name}/out", ir.DataType.FLOAT
    q_shape = m.attention.inputs[0].shape
    if q_shape is not None and q_shape.rank() == 3:
        d = q_shape.dims[2]
        qkv.shape = ir.Shape([*q_shape.dims[:2], 3 * d if isinstance(d, int) else None])
    graph.insert_before(m.attention, linear)
    m.attention.replace_input_with(0, qkv)
    m.attention.replace_input_with(1, None)
    m.attention.replace_input_with(2, None)
    graph.remove(list(m.layers), safe=True)


def merge_qkv(model: ir.Model) -> tuple[list[str], list[Skip]]:
    """Merges the Q/K/V SparseLinear projections of every Attention node where possible, in
    place. Returns (merged node names, the others with the reason)."""
    merged, kept = [], []
    for node in [n for n in model.graph if n.op_type == "Attention" and n.domain == OP_DOMAIN]:
        plan = plan_qkv_merge(node)
        name = node.name or "Attention"
        if isinstance(plan, str):
            if plan != "already packed":
                kept.append(Skip(name, plan))
            continue
        _apply_merge(model.graph, plan)
        merged.append(name)
    return merged, kept


def lower_attention(model: ir.Model, *, merge_projections: bool = True) -> AttentionLoweringReport:
    """Rewrites self-attention MultiHeadAttention nodes into com.fastonnx::Attention and (with
    ``merge_projections``) merges their SparseLinear Q/K/V projections, in place."""
    report = AttentionLoweringReport()
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN]
    plans = [
        (node, node.name or f"MultiHeadAttention_{i}", plan_attention(node))
        for i, node in enumerate(mha)
    ]
    ATTENTION_LOWERING_RULES.apply_to_model(model)
    left = {id(node) for node in model.graph}
    for node, name, plan in plans:
        if isinstance(plan, str):
            report.skipped.append(Skip(name, plan))
        elif id(node) in left:  # planned, yet the rule did not match this node's form
            report.skipped.append(Skip(name, "the rewrite rule did not match this node"))
        else:
            report.lowered.append(LoweredAttention(name, plan.num_heads, plan.mask_note))
    if report.lowered:
        model.opset_imports[OP_DOMAIN] = 1
        if merge_projections:
            report.merged_qkv, report.unmerged_qkv = merge_qkv(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedOpsetsPass()(model)
    return report


class LowerAttentionPass(Pass):
    """:func:`lower_attention` as a configured pass."""

    name = "lower_attention"

    def __init__(self, merge_projections: bool = True):
        super().__init__()
        self.merge_projections = merge_projections

    def run(self, model: ir.Model) -> AttentionLoweringReport:
        return lower_attention(model, merge_projections=self.merge_projections)


__all__ = [
    "AttentionLoweringReport",
    "lower_attention",
    "LowerAttentionPass",
    "LoweredAttention",
    "merge_qkv",
    "plan_attention",
    "plan_qkv_merge",
]
