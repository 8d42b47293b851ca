"""Symbolic shape inference for the passes: onnx-shape-inference, run on onnx_ir directly.

It knows the standard and com.microsoft ops; fastonnx's own ops (``com.fastonnx``) are
registered here, so a model that already holds them (re-optimized, or inspected) keeps its
shapes. Intermediate shapes are inferred afresh (exporters write their own, sometimes unrelated,
dim names); graph inputs and outputs keep theirs, and a value that inference cannot reach
gets back the shape it had.

Where onnx-shape-inference leaves a value unknown, ORT's ``symbolic_shape_infer`` runs instead
(as it did for every model before): it serializes the whole model and took 3.1 s on the
dynamo export of MiniLM-L6 against 0.1 s for onnx-shape-inference, which completes dynamo
exports; TorchScript exports take the fallback (Xeon, 2026-12-02).
"""

from __future__ import annotations

import logging
import math
import struct

import onnx
import onnx_ir as ir
import onnx_shape_inference as osi

from fastonnx.runtime import OP_DOMAIN

logger = logging.getLogger(__name__)

_BLOB_MAGIC = b"FXSW"  # packed weight header: magic, version, header size, then N and K (LE)


def infer_shapes(model: ir.Model) -> int:
    """Re-infer the shapes of intermediate values in place; return how many have one.

    onnx-shape-inference first; when it leaves an intermediate value without a shape (it does
    not follow the TorchScript exporter's attention-mask ``Expand`` target through
    ``Where``/``Equal``, so every legacy export lost its attention fusion), ORT's symbolic shape
    inference instead.
    """
    boundary = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    boundary.update(id(v) for v in model.graph.initializers.values())
    values = [out for node in model.graph for out in node.outputs if id(out) not in boundary]
    saved = {id(v): v.shape for v in values}
    for value in values:
        value.shape = None
    try:
        osi.infer_symbolic_shapes(model, warn_on_missing=False)
        complete = all(value.shape is not None for value in values)
    except (osi.ShapeInferenceError, ValueError, TypeError) as error:
        logger.debug("onnx-shape-inference failed (%s)", error)
        complete = False
    if not complete:
        for value in values:
            value.shape = None
        if not _ort_symbolic_shapes(model, values):
            for value in values:
                value.shape = saved[id(value)]
            return 0
    inferred = 0
    for value in values:
        if value.shape is None:
            value.shape = saved[id(value)]
        else:
            inferred += 1
    return inferred


# --------------------------------------------------------------------------------------------
# fastonnx's ops (docs/operators.md)


def _shape(value: ir.Value | None) -> ir.Shape | None:
    return value.shape if value is not None else None


def _packed_n(weight: ir.Value | None) -> int | None:
    """N (output channels) from a packed weight constant's header, None when unreadable."""
    tensor = ir.convenience.get_const_tensor(weight) if weight is not None else None
    if tensor is None:
        return None
    head = tensor.tobytes()[:16]
    if len(head) < 16 or head[:4] != _BLOB_MAGIC:
        return None
    return struct.unpack_from("<I", head, 8)[0]


@osi.registry.register(OP_DOMAIN, "SparseLinear")
def _sparse_linear(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    x = _shape(node.inputs[0])
    n = _packed_n(node.inputs[1] if len(node.inputs) > 1 else None)
    shape = ir.Shape([*x.dims[:-1], n]) if x is not None and x.rank() and n else None
    ctx.set_shape_and_dtype(node.outputs[0], shape, ir.DataType.FLOAT)


@osi.registry.register(OP_DOMAIN, "SparseLinearU8")
def _sparse_linear_u8(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    _sparse_linear(ctx, node)
    ctx.set_dtype(node.outputs[0], ir.DataType.UINT8)


@osi.registry.register(OP_DOMAIN, "Attention")
def _attention(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    query = _shape(node.inputs[0])
    has_value = len(node.inputs) > 2 and node.inputs[2] is not None
    shape = None
    if query is not None and query.rank() and isinstance(query.dims[-1], int):
        width = query.dims[-1] if has_value else query.dims[-1] // 3  # packed QKV: [Q | K | V]
        shape = ir.Shape([*query.dims[:-1], width])
    ctx.set_shape_and_dtype(node.outputs[0], shape, ir.DataType.FLOAT)
    if len(node.outputs) > 1:  # key_scores: one per token row ([B, S] or packed [T])
        rows = ir.Shape(query.dims[:-1]) if query is not None and query.rank() else None
        ctx.set_shape_and_dtype(node.outputs[1], rows, ir.DataType.FLOAT)


@osi.registry.register(OP_DOMAIN, "LayerNorm")
def _layer_norm(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    x = _shape(node.inputs[0])
    rows = ir.Shape(x.dims[:-1]) if x is not None and x.rank() else None
    kinds = (ir.DataType.FLOAT, ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)
    shapes = (x, x, rows, rows)
    for out, shape, kind in zip(node.outputs, shapes, kinds, strict=False):
        ctx.set_shape_and_dtype(out, shape, kind)


@osi.registry.register(OP_DOMAIN, "PackTokens")
def _pack_tokens(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    hidden = _shape(node.inputs[0])
    if hidden is not None and hidden.rank() == 3:
        tokens = ctx.new_symbolic_dim()
        ctx.set_shape_and_dtype(node.outputs[0], ir.Shape([tokens, hidden.dims[2]]))
        batch = hidden.dims[0]
        count = batch + 1 if isinstance(batch, int) else ctx.new_symbolic_dim()
        ctx.set_shape_and_dtype(node.outputs[1], ir.Shape([count]))
    ctx.set_dtype(node.outputs[0], ir.DataType.FLOAT)
    ctx.set_dtype(node.outputs[1], ir.DataType.INT64)


@osi.registry.register(OP_DOMAIN, "SelectTokens")
def _select_tokens(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    ctx.set_shape_and_dtype(node.outputs[0], ir.Shape([ctx.new_symbolic_dim()]), ir.DataType.INT64)
    ctx.set_shape_and_dtype(node.outputs[1], _shape(node.inputs[1]), ir.DataType.INT64)


@osi.registry.register(OP_DOMAIN, "UnpackTokens")
def _unpack_tokens(ctx: osi.ShapeInferenceContext, node: ir.Node) -> None:
    packed, mask = _shape(node.inputs[0]), _shape(node.inputs[2])
    shape = None
    if packed is not None and mask is not None and packed.rank() == 2 and mask.rank() == 2:
        shape = ir.Shape([*mask.dims, packed.dims[1]])
    ctx.set_shape_and_dtype(node.outputs[0], shape, ir.DataType.FLOAT)


# --------------------------------------------------------------------------------------------
# ORT's symbolic shape inference (the fallback)


# Initializers larger than this are handed to shape inference as typed graph inputs instead.
_SHAPE_INFERENCE_MAX_INITIALIZER = 1024


def _shapes_only_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto for shape inference: weights by type and shape, not by value.

    Shape inference needs the values of small constants (Reshape targets, axes) only. Weights
    become graph inputs, which also keeps ORT's tool away from external-data files, whose
    relative paths it would resolve against the working directory.
    """
    proto = ir.serde.serialize_model(model)
    kept = []
    for tensor in proto.graph.initializer:
        size = math.prod(tensor.dims)
        if (
            tensor.data_location == onnx.TensorProto.EXTERNAL
            or size > _SHAPE_INFERENCE_MAX_INITIALIZER
        ):
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
        else:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def _ort_symbolic_shapes(model: ir.Model, values: list[ir.Value]) -> bool:
    """Shapes of ``values`` from ORT's symbolic shape inference; False when it fails.

    ``auto_merge``: when two different symbolic dims meet in a broadcast it assumes they are
    equal (they must be, unless one of them is 1 at run time), which is what keeps "sequence"
    one name from the embeddings to the output; encoders broadcast B or S only against a
    static 1. It serializes the model (large weights as typed inputs).
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = _shapes_only_proto(model)

    inference = SymbolicShapeInference(
        int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0
    )
    # The same steps as SymbolicShapeInference.infer_shapes, minus its habit of writing
    # "sym_shape_infer_temp.onnx" into the working directory when some shape stays unknown.
    try:
        inference._preprocess(proto)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except Exception as error:  # ORT's tool raises plain Exceptions on unsupported graphs
        logger.warning("symbolic shape inference failed (%s); keeping the exporter's shapes", error)
        return False
    if not complete:
        logger.debug("symbolic shape inference left some shapes unknown")

    inferred = {}
    for info in inference.out_mp_.graph.value_info:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in info.type.tensor_type.shape.dim
            ]
            inferred[info.name] = dims
    for value in values:
        dims = inferred.get(value.name)
        if dims is not None:
            value.shape = ir.Shape(dims)
    return True
