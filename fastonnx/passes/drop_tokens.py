"""Length-adaptive inference: after a layer, drop the tokens that received the least attention.

Dimension letters: B batch, D hidden size, T_l the packed tokens layer l runs on, O_l their
offsets (int64 [B + 1]).

On a packed encoder (:mod:`fastonnx.passes.pack_tokens`: every layer on [T, D] with one
``com.fastonnx::Attention`` per layer), a length configuration gives, for each layer l but the
last, the share of its tokens the next layer keeps (1 keeps all). For each layer with a share
below 1 the pass

1. asks layer l's Attention for its second output, the attention each token receives summed
   over heads and queries (its ``key_scores``);
2. after the layer's output LayerNorm, ``SelectTokens(key_scores, O_l, keep_ratio)`` picks the
   kept rows (each sequence keeps ``ceil(ratio * n)``, its first token always: the
   classification token), and every output of that LayerNorm is gathered to them, so the next
   layer and all after it run on T_{l+1} rows with offsets O_{l+1};
3. before each ``UnpackTokens``, restores the full T_0 rows, dropped tokens holding the
   output of the layer that dropped them (drop-and-restore, as in the Length-Adaptive
   Transformer): one ``ScatterND`` per dropping layer, last first.

The model's inputs and outputs keep their names and shapes. A model that is not packed, or
whose layers do not have this shape, is left unchanged and the report says why. A model without
length training loses accuracy when it drops tokens: measure it (``models/length_adaptive.py``)
before using a configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from fastonnx.model_io import InputError
from fastonnx.passes.base import Pass, Report
from fastonnx.passes.shapes import infer_shapes
from fastonnx.runtime import OP_DOMAIN

_LAYER_NORMS = (("", "LayerNormalization"), (OP_DOMAIN, "LayerNorm"))


class LengthConfigError(InputError):
    """A length configuration that cannot apply to this model."""


@dataclass(kw_only=True)
class DropReport(Report):
    """Layers that drop tokens (``ratios``: the share kept after each), or why none do."""

    ratios: list[float] = field(default_factory=list)
    dropping_layers: list[int] = field(default_factory=list)
    reason: str = ""

    @property
    def counts(self) -> dict[str, int]:
        return {"layers dropping tokens": len(self.dropping_layers)}

    def format(self) -> str:
        if self.dropping_layers:
            kept = ", ".join(f"{r:g}" for r in self.ratios)
            return f"token dropping: share kept after each layer {kept}"
        return f"token dropping not applied: {self.reason}"


def _is(node: ir.Node | None, domain: str, op_type: str) -> bool:
    return node is not None and node.domain == domain and node.op_type == op_type


def _layer_output(attention: ir.Node) -> ir.Node | str:
    """The LayerNorm whose outputs a layer reads: the producer of its Q (or QKV) projection's
    input."""
    projection = attention.inputs[0].producer()
    if not (
        projection and projection.domain == OP_DOMAIN and projection.op_type.startswith("Sparse")
    ):
        return f"{attention.name}: its query is not a SparseLinear projection"
    norm = projection.inputs[0].producer()
    if norm is None or (norm.domain, norm.op_type) not in _LAYER_NORMS:
        return f"{attention.name}: its projection does not read a LayerNorm"
    return norm


def _plan(
    model: ir.Model, attention: list[ir.Node], ratios: Sequence[float]
) -> list[ir.Node] | str:
    """The LayerNorm ending each layer but the last, or why the model does not fit."""
    graph = model.graph
    unpack = [n for n in graph if _is(n, OP_DOMAIN, "UnpackTokens")]
    if not attention or not unpack:
        return "the model is not packed (no fastonnx Attention / UnpackTokens)"
    offsets = attention[0].inputs[4] if len(attention[0].inputs) > 4 else None
    if offsets is None or any(len(a.inputs) < 5 or a.inputs[4] is not offsets for a in attention):
        return "not every Attention reads the packed offsets"
    if len(ratios) != len(attention) - 1:
        raise LengthConfigError(
            f"the length configuration has {len(ratios)} shares; this model has "
            f"{len(attention)} layers, so it takes {len(attention) - 1} (one per layer but the "
            "last)"
        )
    norms = []
    for a in attention[1:]:
        norm = _layer_output(a)
        if isinstance(norm, str):
            return norm
        norms.append(norm)
    order = {id(n): i for i, n in enumerate(graph)}
    last = max(order[id(n)] for n in norms)
    for u in unpack:
        source = u.inputs[0].producer()
        if source is None or order[id(source)] < last:
            return f"{u.name} restores a value computed before the last layer"
    return norms


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    out = [float(r) for r in ratios]
    for i, r in enumerate(out):
        if not (math.isfinite(r) and 0.0 < r <= 1.0):
            raise LengthConfigError(f"share kept after layer {i} must be in (0, 1], got {r}")
    return out


def _with_key_scores(graph: ir.Graph, attention: ir.Node) -> ir.Value:
    """Replace an Attention node with one that also emits its key scores; return them."""
    twin = ir.Node(
        attention.domain,
        attention.op_type,
        list(attention.inputs),
        attributes=list(attention.attributes.values()),
        num_outputs=2,
        name=attention.name,
    )
    y, scores = twin.outputs
    old = attention.outputs[0]
    y.name, y.dtype, y.shape = old.name, old.dtype, old.shape
    old.name = f"{old.name}/replaced"
    scores.name, scores.dtype = f"{attention.name}/key_scores", ir.DataType.FLOAT
    graph.insert_before(attention, twin)
    ir.convenience.replace_all_uses_with(old, y)
    graph.remove(attention, safe=True)
    return scores


def drop_tokens(model: ir.Model, ratios: Sequence[float]) -> DropReport:
    """Apply a length configuration in place (see the module doc): ``ratios[l]`` is the share
    of its tokens that layer l hands to layer l + 1. Raises :class:`LengthConfigError` on a bad
    configuration; a model it cannot apply to is left unchanged with the reason."""
    ratios = _check_ratios(ratios)
    report = DropReport(ratios=ratios)
    attention = [n for n in model.graph if _is(n, OP_DOMAIN, "Attention")]
    if len(ratios) == 1 and len(attention) > 2:
        # One share for every layer but the last.
        ratios = report.ratios = ratios * (len(attention) - 1)
    norms = _plan(model, attention, ratios)
    if isinstance(norms, str):
        report.reason = norms
        return report
    if all(r == 1.0 for r in ratios):
        report.reason = "every layer keeps all its tokens"
        return report
    graph = model.graph
    offsets = attention[0].inputs[4]
    restores: list[tuple[ir.Value, ir.Value]] = []  # (kept rows, the layer's output) per drop
    for layer, (ratio, norm) in enumerate(zip(ratios, norms, strict=True)):
        if ratio == 1.0:
            continue
        scores = _with_key_scores(graph, attention[layer])
        select = ir.node(
            "SelectTokens",
            [scores, offsets],
            attributes={"keep_ratio": ratio},
            domain=OP_DOMAIN,
            num_outputs=2,
            name=f"layer_{layer}/select_tokens",
        )
        kept, new_offsets = select.outputs
        kept.name, new_offsets.name = f"layer_{layer}/kept", f"layer_{layer}/offsets"
        kept.dtype = new_offsets.dtype = ir.DataType.INT64
        added = [select]
        for out in norm.outputs:
            users = list(out.uses())
            if not users:
                continue
            gather = ir.node("Gather", [out, kept], attributes={"axis": 0}, name=f"{out.name}/kept")
            gathered = gather.outputs[0]
            gathered.name, gathered.dtype = f"{out.name}/kept", out.dtype
            for user, index in users:
                user.replace_input_with(index, gathered)
            added.append(gather)
        graph.insert_after(norm, added)
        # Later layers run on the kept rows; UnpackTokens keeps the full offsets.
        after = False
        for node in list(graph):
            after = after or node is select
            if not after or _is(node, OP_DOMAIN, "UnpackTokens") or node is select:
                continue
            for index, value in enumerate(node.inputs):
                if value is offsets:
                    node.replace_input_with(index, new_offsets)
        restores.append((kept, norm.outputs[0]))
        offsets = new_offsets
        report.dropping_layers.append(layer)

    column = ir.Value(
        name="drop_tokens/column",
        type=ir.TensorType(ir.DataType.INT64),
        shape=ir.Shape([2]),
        const_value=ir.tensor(np.array([-1, 1], np.int64)),
    )
    graph.register_initializer(column)
    for unpack in [n for n in graph if _is(n, OP_DOMAIN, "UnpackTokens")]:
        value = unpack.inputs[0]
        added = []
        for i, (kept, full) in enumerate(reversed(restores)):
            index = ir.node("Reshape", [kept, column], name=f"{unpack.name}/restore_{i}/index")
            scatter = ir.node(
                "ScatterND", [full, index.outputs[0], value], name=f"{unpack.name}/restore_{i}"
            )
            value = scatter.outputs[0]
            value.name, value.dtype = f"{unpack.name}/restored_{i}", ir.DataType.FLOAT
            added += [index, scatter]
        graph.insert_before(unpack, added)
        unpack.replace_input_with(0, value)
    # The layers after a drop run on fewer rows than the packed dim their shapes name.
    infer_shapes(model)
    return report


class DropTokensPass(Pass):
    """:func:`drop_tokens` as a configured pass."""

    name = "drop_tokens"

    def __init__(self, ratios: Sequence[float]):
        super().__init__()
        self.ratios = list(ratios)

    def run(self, model: ir.Model) -> DropReport:
        return drop_tokens(model, self.ratios)


__all__ = ["DropReport", "DropTokensPass", "LengthConfigError", "drop_tokens"]
