"""Clean-up that makes exported encoders fusable: inline, infer shapes, fold, simplify, prune.

Exporters write the same attention block in many spellings. Before the fusion rules look at a
graph, this pass brings those spellings to one form:

1. inline model-local functions (the dynamo exporter can wrap ops in functions);
2. infer symbolic shapes (:mod:`fastonnx.passes.shapes`), which names the batch and sequence
   dimensions consistently through the whole graph (ONNX's own inference invents a fresh
   ``unk__N`` name at every broadcast, so equal dimensions stop looking equal);
3. fold constants (the onnxscript optimizer's folder);
4. simplify shape computations: a ``Reshape`` whose target is computed at run time from
   ``Shape`` ops becomes a ``Reshape`` to a constant such as ``[0, 0, 4, 16]``, a no-op
   ``Reshape`` disappears, and "swap the last two axes through a 3-D reshape" becomes one
   ``Transpose``;
5. remove dead nodes, merge common subexpressions, drop unused functions and opsets;
6. put the constant operand of Add/Mul second (exporters disagree on the order).

onnxscript's generic "no-op" rules (``x + 0 -> x`` and friends) are deliberately not used: with
onnxscript 0.7.2 they treat ``var + 1e-12`` (BERT's LayerNorm epsilon in a decomposed
LayerNorm) as ``var + 0`` and delete the epsilon.

Dimension letters used in this module: B batch, S sequence, N heads, H head size, D hidden size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as common_rules

from fastonnx.passes.shapes import infer_shapes

logger = logging.getLogger(__name__)

# A tensor axis size, or an element of a shape vector: a known int, or a symbolic size.
Dim = int | ir.SymbolicDim

_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
# Constant folding limits (elements). Shape computations are tiny; the limit keeps the folder from
# materialising weight-sized tensors (e.g. a transposed weight) as new constants.
_FOLD_INPUT_LIMIT = 8192
_FOLD_OUTPUT_LIMIT = 1 << 20


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old``, graph outputs included, reads ``new`` instead. A graph output keeps
    its name (the model's interface), so ``new`` takes it."""
    name, is_output = old.name, old.is_graph_output()
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output:
        old.name = f"{name}/replaced"
        new.name = name


def count_nodes(model: ir.Model) -> int:
    """Number of nodes in the main graph (subgraphs and functions not included)."""
    return len(model.graph)


# --------------------------------------------------------------------------------------------
# Symbolic dimensions and shape vectors
# --------------------------------------------------------------------------------------------


def same_dim(a: Dim | None, b: Dim | None) -> bool:
    """Whether two dimensions are known to be equal.

    Unknown dimensions (``None`` or an unnamed symbolic dim) are never equal to anything, not even
    to each other: ``onnx_ir`` compares two unnamed symbolic dims as equal, which would be wrong.
    """
    if a is None or b is None:
        return False
    if isinstance(a, ir.SymbolicDim):
        a = a.value
    if isinstance(b, ir.SymbolicDim):
        b = b.value
    return a is not None and b is not None and a == b


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant (initializer or Constant output), else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The value as a flat list of ints when it is a constant integer tensor, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    array = tensor.numpy()
    if array.dtype.kind not in "iu":
        return None
    return [int(x) for x in array.reshape(-1)]


def const_scalar(value: ir.Value | None) -> float | None:
    """The value as a Python float when it is a constant with exactly one element, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


def _int_attr(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def shape_elements(value: ir.Value | None, _depth: int = 0) -> list[Dim] | None:
    """Evaluate a 1-D int64 shape vector symbolically, element by element.

    Each element is either a known int or the size of an axis of some tensor, taken from that
    tensor's (symbolic) shape. This follows the chains exporters write to build ``Reshape``
    targets: ``Shape`` / ``Gather`` / ``Slice`` / ``Unsqueeze`` / ``Squeeze`` / ``Concat`` /
    ``Cast`` / ``Identity``. Returns None when any part is not understood.
    """
    result = _shape_vector(value, _depth)
    if result is None:
        return None
    elements, is_scalar = result
    return None if is_scalar else elements


def _shape_vector(value: ir.Value | None, depth: int) -> tuple[list[Dim], bool] | None:
    """(elements, is_scalar) of an int shape vector or scalar; None when not understood."""
    if value is None or depth > 24:
        return None
    ints = const_ints(value)
    if ints is not None:
        rank = value.shape.rank() if value.shape is not None else None
        tensor = ir.convenience.get_const_tensor(value)
        is_scalar = tensor is not None and len(tensor.shape) == 0
        if rank is not None and rank > 1:
            return None
        return list(ints), is_scalar
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    inputs = node.inputs
    if op == "Shape":
        source = inputs[0]
        if source is None or source.shape is None:
            return None
        dims = list(source.shape.dims)
        start = _int_attr(node, "start", 0)
        end = _int_attr(node, "end", None)
        return dims[start:end], False
    if op == "Identity":
        return _shape_vector(inputs[0], depth + 1)
    if op == "Cast":
        if _int_attr(node, "to", None) != ir.DataType.INT64:
            return None
        return _shape_vector(inputs[0], depth + 1)
    if op == "Gather":
        data = _shape_vector(inputs[0], depth + 1)
        indices = const_ints(inputs[1]) if len(inputs) > 1 else None
        if data is None or data[1] or indices is None or _int_attr(node, "axis", 0) != 0:
            return None
        elements = data[0]
        try:
            picked = [elements[i] for i in indices]
        except IndexError:
            return None
        index_tensor = ir.convenience.get_const_tensor(inputs[1])
        is_scalar = index_tensor is not None and len(index_tensor.shape) == 0
        return picked, is_scalar
    if op == "Slice":
        data = _shape_vector(inputs[0], depth + 1)
        if data is None or data[1]:
            return None
        starts = const_ints(inputs[1]) if len(inputs) > 1 else None
        ends = const_ints(inputs[2]) if len(inputs) > 2 else None
        axes = const_ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else [0]
        steps = const_ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or axes not in ([0], [-1]):
            return None
        # Python slicing clamps out-of-range bounds the same way ONNX Slice does; INT64 min/max
        # are the exporters' spelling of "from the start" / "to the end".
        start = None if starts[0] <= _INT64_MIN + 1 else starts[0]
        end = None if ends[0] >= _INT64_MAX - 1 else ends[0]
        return data[0][start : end : steps[0]], False
    if op == "Unsqueeze":
        data = _shape_vector(inputs[0], depth + 1)
        axes = const_ints(inputs[1]) if len(inputs) > 1 else node.attributes.get_ints("axes")
        if data is None or not data[1] or axes is None or list(axes) not in ([0], [-1]):
            return None
        return data[0], False
    if op == "Squeeze":
        data = _shape_vector(inputs[0], depth + 1)
        if data is None or data[1] or len(data[0]) != 1:
            return None
        return data[0], True
    if op == "Reshape":
        # Reshape of a shape vector to [-1] or [n] keeps it a vector (seen around Concat).
        data = _shape_vector(inputs[0], depth + 1)
        target = const_ints(inputs[1])
        if data is None or target is None or len(target) != 1:
            return None
        if target[0] not in (-1, len(data[0])):
            return None
        return data[0], False
    if op == "Concat":
        if _int_attr(node, "axis", None) not in (0, -1):
            return None
        elements: list[Dim] = []
        for part in inputs:
            sub = _shape_vector(part, depth + 1)
            if sub is None or sub[1]:
                return None
            elements.extend(sub[0])
        return elements, False
    return None


def canonical_reshape_target(
    input_shape: ir.Shape | None, elements: Sequence[Dim], allowzero: int
) -> list[int] | str:
    """A constant Reshape target equivalent to ``elements`` for this input, or why there is none.

    An element that is known to equal the input's size on the same axis becomes ``0`` ("copy this
    axis"), a known int stays, and at most one remaining unknown element becomes ``-1``.
    """
    if input_shape is None:
        return "the reshaped tensor has no known shape"
    in_dims = list(input_shape.dims)
    target: list[int] = []
    unknown = 0
    for axis, element in enumerate(elements):
        if isinstance(element, int):
            if element == 0 and allowzero:
                return "the target has a literal 0 with allowzero=1"
            target.append(element)
            if element == -1:
                unknown += 1
        elif axis < len(in_dims) and same_dim(element, in_dims[axis]):
            target.append(0)
        else:
            target.append(-1)
            unknown += 1
    if unknown > 1:
        return f"{unknown} axes of the target are unknown; at most one can be -1"
    return target


def is_identity_reshape(input_shape: ir.Shape | None, target: Sequence[int]) -> bool:
    """Whether Reshape(x, target) (allowzero=0) returns x's shape unchanged."""
    if input_shape is None or len(target) != input_shape.rank():
        return False
    # Every axis but at most one (the -1) must be a copy or equal a known static size; the -1
    # axis then has to take the remaining size, which is the input's own.
    free = 0
    for element, dim in zip(target, input_shape.dims, strict=True):
        if element == 0:
            continue
        if element == -1:
            free += 1
        elif not (isinstance(dim, int) and dim == element):
            return False
    return free <= 1


# --------------------------------------------------------------------------------------------
# Shape-simplification rules
# --------------------------------------------------------------------------------------------


class ConstantReshapeTarget(pattern.RewriteRuleClassBase):
    """Reshape(x, <run-time shape>) -> Reshape(x, <constant>), or Identity when it is a no-op.

    Exporters build targets like ``Concat(Shape(x)[0:1], Shape(x)[1:2], [-1], [16])``. Provably
    copying an axis of the input becomes ``0``, so the target is a constant the fusion rules can
    read and the whole ``Shape`` chain goes dead.
    """

    def pattern(self, op, x, target):
        return op.Reshape(x, target, _allow_other_attributes=True, _outputs=["reshaped"])

    def check(self, context, x, target, reshaped, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        proposal = self._proposal(x, target, reshaped)
        if isinstance(proposal, str):
            return result.fail(proposal, reshaped.producer())
        return result

    def rewrite(self, op, x, target, reshaped, **_):
        proposal = self._proposal(x, target, reshaped)
        if isinstance(proposal, str):  # check() accepted this match, so this cannot happen
            raise RuntimeError(proposal)
        if is_identity_reshape(x.shape, proposal):
            return op.Identity(x)
        return op.Reshape(x, op.Constant(value_ints=proposal))

    @staticmethod
    def _proposal(x: ir.Value, target: ir.Value, reshaped: ir.Value) -> list[int] | str:
        allowzero = _int_attr(reshaped.producer(), "allowzero", 0) or 0
        constant = const_ints(target)
        if constant is not None:
            # Only a constant no-op is worth a rewrite; other constant targets are already final.
            if allowzero and 0 in constant:
                return "constant target with literal 0 under allowzero=1"
            if is_identity_reshape(x.shape, constant):
                return constant
            return "the target is already a constant"
        elements = shape_elements(target)
        if elements is None:
            return "the target is not a shape computation this pass understands"
        return canonical_reshape_target(x.shape, elements, allowzero)


class TransposeLastTwoVia3D(pattern.RewriteRuleClassBase):
    """Reshape(Transpose(Reshape(x, [-1, S, H]), [0, 2, 1]), [B, N, H, S]) -> Transpose(x).

    The replacement transposes x with perm [0, 1, 3, 2].
    torch's SDPA decomposition swaps the key's last two axes by folding x [B, N, S, H] into 3-D,
    transposing and unfolding. Both targets are checked axis by axis against x's shape.
    """

    def pattern(self, op, x, fold_target, unfold_target):
        folded = op.Reshape(x, fold_target, _allow_other_attributes=True)
        swapped = op.Transpose(folded, perm=[0, 2, 1])
        return op.Reshape(swapped, unfold_target, _allow_other_attributes=True)

    def check(self, context, x, fold_target, unfold_target, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() != 4:
            return result.fail("x is not known to be 4-D", x)
        b, n, s, h = x.shape.dims
        fold = shape_elements(fold_target)
        if fold is None or len(fold) != 3:
            return result.fail("fold target is not an understood 3-element shape", fold_target)
        fold_first_ok = fold[0] == -1 or (
            isinstance(b, int) and isinstance(n, int) and fold[0] == b * n
        )
        if not (fold_first_ok and same_dim(fold[1], s) and same_dim(fold[2], h)):
            return result.fail(f"fold target {fold} is not [B*N, S, H] of {x.shape}", fold_target)
        unfold = shape_elements(unfold_target)
        expected = (b, n, h, s)
        if unfold is None or len(unfold) != 4:
            return result.fail("unfold target is not an understood 4-element shape", unfold_target)
        if not all(same_dim(e, d) for e, d in zip(unfold, expected, strict=True)):
            return result.fail(f"unfold target {unfold} is not [B, N, H, S]", unfold_target)
        return result

    def rewrite(self, op, x, **_):
        return op.Transpose(x, perm=[0, 1, 3, 2])


SHAPE_RULES = pattern.RewriteRuleSet(
    [
        ConstantReshapeTarget.rule(),
        TransposeLastTwoVia3D.rule(),
        # Generic simplifications from onnxscript; they leave MatMul/Add alone.
        common_rules.no_op_cast_rule,
        common_rules.cast_cast_rule,
        common_rules.no_op_expand_rule,
        common_rules.no_op_transpose_rule,
        common_rules.transpose_transpose_rule,
        common_rules.unsqueeze_unsqueeze_rule,
        common_rules.collapse_slice_rule,
        common_rules.collapse_slice2_rule,
    ]
)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


_COMMUTATIVE = frozenset({"Add", "Mul"})


def _constants_last(model: ir.Model) -> int:
    """Put the constant operand of Add/Mul second, so rules need not list both orders.

    The legacy exporter writes ``Add(bias, MatMul(x, W))``, the dynamo exporter
    ``Add(MatMul(x, W), bias)``. Returns how many nodes had their operands swapped.
    """
    swapped = 0
    for node in model.graph:
        if node.op_type not in _COMMUTATIVE or node.domain != "" or len(node.inputs) != 2:
            continue
        first, second = node.inputs
        if first is None or second is None:
            continue
        first_const = ir.convenience.get_const_tensor(first) is not None
        second_const = ir.convenience.get_const_tensor(second) is not None
        if first_const and not second_const:
            node.replace_input_with(0, second)
            node.replace_input_with(1, first)
            swapped += 1
    return swapped


def _fold_constants(model: ir.Model) -> bool:
    result = fold_constants(
        model,
        onnx_shape_inference=True,
        input_size_limit=_FOLD_INPUT_LIMIT,
        output_size_limit=_FOLD_OUTPUT_LIMIT,
    )
    return result.modified


def _remove_dead(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)


def cleanup(model: ir.Model, *, max_rounds: int = 4) -> dict[str, int]:
    """Clean an exported encoder in place so the fusion rules can match it.

    Returns counts: ``functions_inlined`` (call sites expanded), ``constants_folded`` (nodes
    that folding and the dead code it left removed), ``shapes_simplified`` (shape-rule rewrites),
    ``operands_reordered`` (Add/Mul nodes whose constant operand was moved second) and
    ``nodes_removed`` (net change in the main graph's node count, inlining included).
    """
    counts = {
        "functions_inlined": 0,
        "constants_folded": 0,
        "shapes_simplified": 0,
        "operands_reordered": 0,
        "nodes_removed": 0,
    }
    nodes_start = count_nodes(model)
    if model.functions:
        inlined = common_passes.InlinePass()(model)
        counts["functions_inlined"] = sum(inlined.id_count.values())

    common_passes.IdentityEliminationPass()(model)
    infer_shapes(model)
    for _ in range(max_rounds):
        before = count_nodes(model)
        folded = _fold_constants(model)
        _remove_dead(model)
        counts["constants_folded"] += max(0, before - count_nodes(model))
        simplified = SHAPE_RULES.apply_to_model(model)
        counts["shapes_simplified"] += simplified
        _remove_dead(model)
        if not folded and not simplified:
            break

    common_passes.CommonSubexpressionEliminationPass()(model)
    _remove_dead(model)
    counts["operands_reordered"] = _constants_last(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    counts["nodes_removed"] = nodes_start - count_nodes(model)
    return counts
