"""Packed (padding-free) execution: the encoder runs on its valid tokens only.

Dimension letters: B batch, S sequence, D hidden size, T valid tokens (the ones of
``attention_mask``), O offsets (int64 [B + 1], cumulative: sequence b is packed rows
[O[b], O[b+1])).

On a model whose self-attention is ``com.fastonnx::Attention`` (the ``sparse-int8`` preset's
:mod:`fastonnx.passes.lower_attention`), the pass

1. checks that every Attention reads the same additive mask and that the mask is a pure key
   padding mask of the model's ``attention_mask`` input: its subgraph is run on probe masks
   (holes, left padding, an all-padding row, none) and must give exactly 0 where a key is a
   token and <= -1e30 (a skipped key) where it is padding, for every query;
2. finds the packed region: the LayerNorm that feeds the first attention block (the
   embeddings') and every node downstream of it, each of which must be per token (SparseLinear,
   LayerNorm, elementwise ops broadcasting over the last axis only, Attention...);
3. rewrites it: ``PackTokens(hidden, attention_mask) -> ([T, D], O)`` before that LayerNorm, every
   region node on [T, *], each Attention reading ``O`` instead of the mask, and
   ``UnpackTokens(y, O, attention_mask) -> [B, S, D]`` before each encoder output (zeros at
   padded positions) and before nodes that only select positions (a classifier head's
   first-token Gather, a Slice over the sequence axis: they read 0 at a padded position). The
   model's inputs and outputs keep their names, types and shapes.

Anything else leaves the model unchanged; the report says why (:class:`PackingReport`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx import helper

from fastonnx.passes.base import Pass, Report
from fastonnx.passes.cleanup import const_array, same_dim
from fastonnx.runtime import OP_DOMAIN

MS_DOMAIN = "com.microsoft"
SKIP_THRESHOLD = -1e30  # Attention skips keys at or below this (docs/operators.md)
PACKED_DIM = "packed_tokens"  # the symbolic name of T

_FLOAT_UNARY = {
    "Abs",
    "Cast",
    "Erf",
    "Exp",
    "Gelu",
    "Identity",
    "Log",
    "Neg",
    "Reciprocal",
    "Relu",
    "Sigmoid",
    "Softplus",
    "Sqrt",
    "Tanh",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


@dataclass(kw_only=True)
class PackingReport(Report):
    """Whether packed execution applied, and why not (``reason``)."""

    applied: bool = False
    reason: str = ""  # why not, or what was done
    attention_nodes: int = 0
    region_nodes: int = 0
    mask_input: str | None = None
    outputs: list[str] = field(default_factory=list)  # what reads UnpackTokens' [B, S, D]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "packed": int(self.applied),
            "nodes on packed tokens": self.region_nodes if self.applied else 0,
        }

    def format(self) -> str:
        if self.applied:
            return (
                f"packed execution: {self.region_nodes} nodes ({self.attention_nodes} Attention) "
                f"run on the valid tokens of '{self.mask_input}'; restored to [B, S, *] with "
                f"zeros at padded positions for {', '.join(self.outputs)}"
            )
        return f"packed execution not applied: {self.reason}"


# --------------------------------------------------------------------------------------------
# The mask


def _ancestors(value: ir.Value) -> tuple[list[ir.Node], list[ir.Value]] | str:
    """The nodes computing value (topological order) and the graph inputs they read."""
    nodes: dict[int, ir.Node] = {}
    inputs: dict[int, ir.Value] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None:
            continue
        node = v.producer()
        if node is None:
            if v.is_graph_input():
                inputs[id(v)] = v
            elif v.const_value is None:
                return f"'{v.name}' has no producer and is not a constant"
            continue
        if id(node) in nodes:
            continue
        if any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values()):
            return f"the mask is computed with a subgraph ({node.op_type} '{node.name}')"
        nodes[id(node)] = node
        stack.extend(node.inputs)
    graph = value.graph
    order = {id(n): i for i, n in enumerate(graph)} if graph is not None else {}
    return sorted(nodes.values(), key=lambda n: order.get(id(n), 0)), list(inputs.values())


def _subgraph_model(model: ir.Model, nodes: list[ir.Node], inputs: list[ir.Value], out: ir.Value):
    consts = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.producer() is None and v.const_value is not None:
                consts[v.name] = ir.serde.serialize_tensor(v.const_value)
    graph = helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "mask",
        [ir.serde.serialize_value(v) for v in inputs],
        [helper.make_tensor_value_info(out.name, onnx.TensorProto.FLOAT, None)],
        list(consts.values()),
    )
    opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=min(model.ir_version, 10))


def _probe_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    holes = (rng.random((3, 7)) < 0.6).astype(np.int64)
    holes[:, 0] = 1
    left = np.ones((3, 9), np.int64)
    left[1, :4] = 0
    left[2] = 0
    ragged = np.ones((4, 5), np.int64)
    ragged[1, 3:] = 0
    ragged[2, 1:] = 0
    return [holes, left, ragged, np.ones((2, 6), np.int64), np.ones((1, 1), np.int64)]


def check_padding_mask(model: ir.Model, mask: ir.Value) -> tuple[ir.Value, str] | str:
    """The graph input whose key-padding mask ``mask`` is, with how it was checked, or why it
    is not one (a pure function of the model)."""
    found = _ancestors(mask)
    if isinstance(found, str):
        return found
    nodes, inputs = found
    if not inputs:
        return "the attention mask does not depend on any model input"
    named = [v for v in inputs if v.name == "attention_mask"]
    source = named[0] if named else (inputs[0] if len(inputs) == 1 else None)
    if source is None:
        names = ", ".join(v.name for v in inputs)
        return f"the attention mask depends on several inputs ({names}), none named attention_mask"
    if not named:
        # Any other name: it must be a mask only (input ids are 0/1 on probes too, but not in use).
        inside = {id(n) for n in nodes}
        if any(id(user) not in inside for user, _ in source.uses()) or source.is_graph_output():
            return f"'{source.name}' is not named attention_mask and has uses besides the mask"
    if source.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return f"'{source.name}' is {source.dtype}, not int64/int32"
    if source.shape is None or source.shape.rank() != 2:
        return f"'{source.name}' is not known to be 2-D [B, S]"
    for v in inputs:
        if (
            v.shape is None
            or v.shape.rank() != 2
            or not all(same_dim(a, b) for a, b in zip(v.shape.dims, source.shape.dims, strict=True))
        ):
            return f"the attention mask depends on '{v.name}', which is not [B, S] like the mask"
    import onnxruntime as ort

    proto = _subgraph_model(model, nodes, inputs, mask)
    try:
        from fastonnx.runtime import session_options

        so = session_options(1)  # the subgraph may hold fastonnx ops (a lowered LayerNorm)
        so.log_severity_level = 3
        session = ort.InferenceSession(
            proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        return f"the attention mask's subgraph does not run on its own ({str(exc)[:120]})"
    for probe in _probe_masks():
        for other_fill in (0, 1):  # the mask must not depend on the other inputs' values
            feeds = {
                v.name: (probe if v is source else np.full(probe.shape, other_fill)).astype(
                    v.dtype.numpy()
                )
                for v in inputs
            }
            try:
                (m,) = session.run(None, feeds)
            except Exception as exc:  # noqa: BLE001
                return f"the attention mask's subgraph failed on a probe mask ({str(exc)[:120]})"
            b, s = probe.shape
            if m.ndim != 4 or m.shape[-1] != s or m.shape[0] not in (1, b):
                return f"the attention mask has shape {list(m.shape)} for a [{b}, {s}] input"
            keep = np.broadcast_to(
                probe.astype(bool)[:, None, None, :], np.broadcast_shapes(m.shape, (b, 1, 1, s))
            )
            m = np.broadcast_to(m, keep.shape)
            if not (np.all(m[keep] == 0) and np.all(m[~keep] <= SKIP_THRESHOLD)):
                return (
                    "the attention mask is not a pure key-padding mask of "
                    f"'{source.name}' (0 at tokens, <= -1e30 at padding, for every query)"
                )
    return source, f"{len(_probe_masks())} probe masks"


# --------------------------------------------------------------------------------------------
# The region


def _is_ort_int8_weight(value: ir.Value | None) -> bool:
    """Whether a MatMul weight is a DequantizeLinear of a constant (a layer left on ORT's QDQ
    int8 path)."""
    node = value.producer() if value is not None else None
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and node.domain in ("", "ai.onnx")
        and const_array(node.inputs[0]) is not None
    )


def _token_broadcast(value: ir.Value) -> str | None:
    """None when a constant operand broadcasts over the last axis only."""
    c = const_array(value)
    if c is None:
        return f"'{value.name}' is neither on packed tokens nor a constant"
    if c.ndim >= 2 and any(d != 1 for d in c.shape[:-1]):
        return f"constant '{value.name}' of shape {list(c.shape)} varies over more than features"
    return None


def _per_token_problem(node: ir.Node, region: set[int], mask: ir.Value) -> str | None:
    """None when ``node`` computes each token from that token alone (its region inputs being
    packed), else why not."""
    op = (node.domain or "", node.op_type)
    ins = list(node.inputs)

    def in_region(v: ir.Value | None) -> bool:
        return v is not None and id(v) in region

    def consts(slots: Iterable[int]) -> str | None:
        for i in slots:
            if i < len(ins) and ins[i] is not None and const_array(ins[i]) is None:
                return f"input {i} '{ins[i].name}' is not a constant"
        return None

    def outputs_unused(slots: Iterable[int]) -> str | None:
        for out in (node.outputs[i] for i in slots if i < len(node.outputs)):
            if list(out.uses()) or out.is_graph_output():
                return f"output '{out.name}' (statistics over tokens) is used"
        return None

    if op in ((OP_DOMAIN, "SparseLinear"), (OP_DOMAIN, "SparseLinearU8")):
        if not in_region(ins[0]):
            return "its input X is not on packed tokens"
        for slot, what in ((5, "residual"), (8, "x_row_scale"), (9, "x_row_zero_point")):
            if len(ins) > slot and ins[slot] is not None and not in_region(ins[slot]):
                return f"its {what} is not on packed tokens"
        return consts([1, 2, 3, 4, 6, 7])
    if op == (OP_DOMAIN, "LayerNorm"):  # Y, its per-row quantization: all per token
        if node.attributes.get_int("axis", -1) != -1:
            return "it normalizes over another axis than the features"
        return consts([1, 2])
    if op == (OP_DOMAIN, "Attention"):
        padded = ins + [None] * (5 - len(ins))
        if padded[4] is not None:
            return "it already reads packed tokens"
        if padded[3] is not mask:
            return "its mask is not the other Attention nodes' mask"
        if not in_region(padded[0]) or any(x is not None and not in_region(x) for x in padded[1:3]):
            return "its query/key/value are not all on packed tokens"
        return None
    if op == ("", "LayerNormalization"):
        axis = node.attributes.get_int("axis", -1)
        if axis not in (-1, 2):
            return f"it normalizes over axis {axis}, not the features"
        return outputs_unused([1, 2]) or consts([1, 2])
    if op == (MS_DOMAIN, "SkipLayerNormalization"):
        if not (in_region(ins[0]) and in_region(ins[1])):
            return "its inputs are not both on packed tokens"
        return outputs_unused([1, 2]) or consts([2, 3, 4])
    if op[0] == "" and op[1] in _FLOAT_UNARY:
        if op[1] == "Cast" and node.attributes.get_int("to", 0) != ir.DataType.FLOAT:
            return "it casts to a type other than float32"
        return None
    if op in ((MS_DOMAIN, "Gelu"), (MS_DOMAIN, "FastGelu"), (MS_DOMAIN, "BiasGelu")):
        return consts(range(1, len(ins)))
    if op[0] == "" and op[1] in _BINARY:
        for v in ins:
            if not in_region(v):
                problem = _token_broadcast(v)
                if problem:
                    return problem
        return None
    if op == ("", "MatMul"):
        w = const_array(ins[1]) if len(ins) > 1 else None
        if w is not None and w.ndim == 2:
            return None
        if len(ins) > 1 and _is_ort_int8_weight(ins[1]):
            # On [T, D] ORT fuses MatMul + bias into a Gemm, which its QDQ fusion leaves in
            # float (weights dequantized on every run): measured 2.3x slower than padded.
            return (
                "it is a layer kept on ORT's int8 path, which ORT runs in float on 2-D packed "
                "tokens (lower it: --min-sparsity 0)"
            )
        return "its B is not a constant 2-D weight"
    if op[0] == "" and op[1] in ("QuantizeLinear", "DequantizeLinear"):
        for v in ins[1:]:
            c = const_array(v)
            if v is not None and (c is None or c.size != 1):
                return "its scale/zero point is not a per-tensor constant"
        return None
    return f"{op[0] + '::' if op[0] else ''}{op[1]} is not known to be per token"


def _reads_positions(node: ir.Node, index: int) -> bool:
    """Whether ``node`` only selects sequence positions of its input ``index`` (a classifier's
    first-token Gather, a Slice of positions): it can read the restored [B, S, D] tensor."""
    if index != 0 or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Gather":
        axis = node.attributes.get_int("axis", 0)
        return axis in (1, -2) and const_array(node.inputs[1]) is not None
    if node.op_type == "Slice" and len(node.inputs) >= 4:
        axes = const_array(node.inputs[3])
        consts = all(const_array(v) is not None for v in node.inputs[1:] if v is not None)
        return consts and axes is not None and set(axes.reshape(-1).tolist()) <= {1, -2}
    return False


@dataclass(frozen=True)
class _Plan:
    start: ir.Value  # [B, S, D] hidden states to pack
    mask_input: ir.Value  # the model's attention_mask
    mask: ir.Value  # the additive mask the Attention nodes read
    region: list[ir.Node]  # graph order
    outputs: list[ir.Value]  # region values that are graph outputs
    attention: list[ir.Node]
    selectors: list[tuple[ir.Node, int]]  # (node, input) selecting positions of a region value


def _is_layer_norm(node: ir.Node) -> bool:
    return (node.op_type, node.domain) in (
        ("LayerNormalization", ""),
        ("LayerNormalization", "ai.onnx"),
        ("LayerNorm", OP_DOMAIN),
    )


def _find_start(attention: ir.Node) -> ir.Value | str:
    """The input of the LayerNorm feeding the first attention's projections (the embeddings'):
    the packed region starts with that LayerNorm, so its quantized outputs are packed too."""
    value = attention.inputs[0]
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            break
        if _is_layer_norm(node):
            return node.inputs[0]
        value = node.inputs[0] if node.inputs else None
    return "no LayerNorm (the embeddings') found before the first attention's projections"


def _mask_only(mask: ir.Value, attention: list[ir.Node]) -> set[int]:
    """Ids of the nodes computing the mask whose outputs feed nothing but the mask: they die
    once the Attention nodes read offsets instead (legacy exports take the mask's sizes from
    Shape(hidden states), which then reads packed tokens harmlessly)."""
    found = _ancestors(mask)
    if isinstance(found, str):
        return set()
    nodes = {id(n): n for n in found[0]}
    readers = {id(n) for n in attention}
    dead: dict[int, bool] = {}

    def is_dead(node: ir.Node) -> bool:
        if id(node) not in dead:
            dead[id(node)] = False  # cycles cannot happen; a guard all the same
            dead[id(node)] = all(
                not out.is_graph_output()
                and all(
                    (id(u) in readers and i == 3 and out is mask) or (id(u) in nodes and is_dead(u))
                    for u, i in out.uses()
                )
                for out in node.outputs
            )
        return dead[id(node)]

    return {i for i, n in nodes.items() if is_dead(n)}


def plan_packing(model: ir.Model) -> _Plan | str:
    """How to pack the model, or why it cannot be (a pure function)."""
    graph = model.graph
    if any(n.op_type == "PackTokens" and n.domain == OP_DOMAIN for n in graph):
        return "already packed (the model has a PackTokens node)"
    attention = [n for n in graph if n.op_type == "Attention" and n.domain == OP_DOMAIN]
    if not attention:
        return "no com.fastonnx::Attention (the sparse-int8 preset's lower_attention emits it)"
    if any(n.op_type == "MultiHeadAttention" for n in graph):
        return "some attention runs on ORT's MultiHeadAttention, which needs padded batches"
    masks = {id((list(n.inputs) + [None] * 4)[3]) for n in attention}
    mask = (list(attention[0].inputs) + [None] * 4)[3]
    if mask is None:
        return "Attention has no mask: the model attends to padding, and packing would change that"
    if len(masks) != 1:
        return "the Attention nodes read different masks"
    checked = check_padding_mask(model, mask)
    if isinstance(checked, str):
        return checked
    mask_input, _ = checked
    start = _find_start(attention[0])
    if isinstance(start, str):
        return start
    shape = start.shape
    if (
        start.dtype != ir.DataType.FLOAT
        or shape is None
        or shape.rank() != 3
        or not all(map(same_dim, shape.dims[:2], mask_input.shape.dims))
    ):
        return f"'{start.name}' is not known to be float [B, S, D] with the mask's B and S"

    region: set[int] = set()
    nodes: dict[int, ir.Node] = {}
    selectors: list[tuple[ir.Node, int]] = []
    mask_only = _mask_only(mask, attention)
    frontier = [start]
    while frontier:
        value = frontier.pop()
        region.add(id(value))
        for user, _ in value.uses():
            if id(user) in nodes:
                continue
            if id(user) in mask_only:
                continue  # computes only the mask, which the packed Attention no longer reads
            if _reads_positions(user, 0) and user.inputs[0] is value:
                if value is not start:  # reads the restored [B, S, D] (a classifier head)
                    selectors.append((user, 0))
                continue
            nodes[id(user)] = user
            frontier.extend(user.outputs)
    for value in [start, *(o for n in nodes.values() for o in n.outputs)]:
        region.add(id(value))
    order = {id(n): i for i, n in enumerate(graph)}
    ordered = sorted(nodes.values(), key=lambda n: order[id(n)])
    for node in ordered:
        problem = _per_token_problem(node, region, mask)
        if problem:
            return f"{node.op_type} '{node.name}' after the embeddings: {problem}"
        for out in node.outputs:
            if not (list(out.uses()) or out.is_graph_output()):
                continue
            s = out.shape
            if (
                s is None
                or s.rank() not in (2, 3)
                or not all(same_dim(a, b) for a, b in zip(s.dims[:2], shape.dims[:2], strict=True))
            ):
                return f"'{out.name}' is not known to be [B, S, *] or [B, S]"
    outside = [n.name for n in attention if id(n) not in nodes]
    if outside:
        return f"Attention {outside[0]} is not downstream of '{start.name}'"
    outputs = [v for v in graph.outputs if id(v) in region and v is not start]
    for v in outputs:
        if v.dtype != ir.DataType.FLOAT:
            return f"output '{v.name}' is {v.dtype}; UnpackTokens restores float32 only"
    if not outputs and not selectors:
        return "no model output is computed on the packed tokens"
    return _Plan(start, mask_input, mask, ordered, outputs, attention, selectors)


# --------------------------------------------------------------------------------------------
# The rewrite


def _apply(graph: ir.Graph, plan: _Plan) -> None:
    start = plan.start
    pack = ir.node(
        "PackTokens",
        [start, plan.mask_input],
        domain=OP_DOMAIN,
        num_outputs=2,
        name=f"{start.name}/pack_tokens",
    )
    packed, offsets = pack.outputs
    packed.name, offsets.name = f"{start.name}/packed", f"{start.name}/offsets"
    packed.dtype, offsets.dtype = ir.DataType.FLOAT, ir.DataType.INT64
    packed.shape = ir.Shape([ir.SymbolicDim(PACKED_DIM), start.shape.dims[2]])
    offsets.shape = ir.Shape([None])
    graph.insert_before(plan.region[0], pack)  # the embeddings' LayerNorm
    region_ids = {id(n) for n in plan.region}
    for user, index in list(start.uses()):
        if id(user) in region_ids:
            user.replace_input_with(index, packed)

    for node in plan.region:
        for i, v in enumerate(node.inputs):
            # Constants of rank >= 2 ([1, 1, D]) would broadcast [T, D] back to rank 3.
            c = const_array(v) if v is not None and v.producer() is None else None
            if c is not None and c.ndim >= 2 and node.op_type in _BINARY:
                flat = ir.Value(name=f"{v.name}/per_token", const_value=ir.tensor(c.reshape(-1)))
                graph.register_initializer(flat)
                node.replace_input_with(i, flat)
        if node.op_type == "LayerNormalization":
            node.attributes["axis"] = ir.AttrInt64("axis", -1)
        if node.op_type == "Attention" and node.domain == OP_DOMAIN:
            node.resize_inputs(5)
            node.replace_input_with(3, None)
            node.replace_input_with(4, offsets)
        for out in node.outputs:
            if out.shape is not None and out.shape.rank() == 3:
                out.shape = ir.Shape([ir.SymbolicDim(PACKED_DIM), out.shape.dims[2]])
            elif out.shape is not None and out.shape.rank() == 2:  # per-token scalars
                out.shape = ir.Shape([ir.SymbolicDim(PACKED_DIM)])

    # One UnpackTokens per packed value read as [B, S, D]: a model output (which keeps its
    # name) or the input of a position selector.
    wanted = list(plan.outputs) + [node.inputs[i] for node, i in plan.selectors]
    for value in {id(v): v for v in wanted}.values():
        name, shape = value.name, value.shape
        is_output = any(value is v for v in plan.outputs)
        if is_output:
            value.name = f"{name}/packed"
        unpack = ir.node(
            "UnpackTokens",
            [value, offsets, plan.mask_input],
            domain=OP_DOMAIN,
            name=f"{name}/unpack_tokens",
        )
        restored = unpack.outputs[0]
        restored.name = name if is_output else f"{name}/unpacked"
        restored.dtype = ir.DataType.FLOAT
        restored.shape = ir.Shape([*start.shape.dims[:2], shape.dims[-1] if shape else None])
        graph.insert_after(value.producer(), unpack)
        if is_output:
            graph.outputs[list(graph.outputs).index(value)] = restored
        for node, i in plan.selectors:
            if node.inputs[i] is value:
                node.replace_input_with(i, restored)


def pack_tokens(model: ir.Model) -> PackingReport:
    """Rewrites the encoder to run on its valid tokens only, in place, where it can (see the
    module docstring); otherwise leaves the model unchanged and says why."""
    plan = plan_packing(model)
    if isinstance(plan, str):
        return PackingReport(reason=plan)
    names = [v.name for v in plan.outputs]
    names += [f"{n.op_type} '{n.name}' (reads positions)" for n, _ in plan.selectors]
    _apply(model.graph, plan)
    model.opset_imports[OP_DOMAIN] = 1
    common_passes.RemoveUnusedNodesPass()(model)
    return PackingReport(
        applied=True,
        reason="applied",
        attention_nodes=len(plan.attention),
        region_nodes=len(plan.region),
        mask_input=plan.mask_input.name,
        outputs=names,
    )


class PackTokensPass(Pass):
    """:func:`pack_tokens` as a configured pass (``enabled=False``: reports it was off)."""

    name = "pack_tokens"

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled

    def run(self, model: ir.Model) -> PackingReport:
        if not self.enabled:
            return PackingReport(reason="turned off (--no-packing)")
        return pack_tokens(model)


__all__ = ["check_padding_mask", "pack_tokens", "PackingReport", "PackTokensPass", "plan_packing"]
