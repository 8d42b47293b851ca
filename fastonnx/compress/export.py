"""Export a (pruned) model to ONNX and prove the block sparsity survived the export.

Two outputs are supported:

* ``last_hidden_state`` — the encoder alone, through :func:`fastonnx.export.export_encoder`;
* ``logits`` — a task model (``...ForSequenceClassification``) with its head, through
  :func:`export_logits` here: same inputs, dynamic axes and exporters as ``export_encoder``,
  one output ``logits`` [B, L] (B batch, L labels).

The check reads the ONNX file's weights back (initializers and Constant nodes), finds each
pruned layer's weight by value (as W [N, K] or transposed, as the exporters may store it), and
measures its block sparsity there. A pruned layer whose weight cannot be found, or whose zero
blocks differ, is a :class:`SparsityCheckError`: the sparse lowering would then not see the
structure training paid for.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fastonnx.compress._deps import require_torch, require_transformers
from fastonnx.compress.pruning import (
    DEFAULT_EXCLUDE,
    BlockPruner,
    BlockShape,
    LayerSparsity,
    format_report,
    measure,
    resolve_block_shape,
    select_linear_layers,
)

LOGITS = "logits"
HIDDEN = "last_hidden_state"
EXPORTERS = ("dynamo", "legacy")


class SparsityCheckError(RuntimeError):
    """The exported ONNX weights do not carry the pruned model's block sparsity."""


# --------------------------------------------------------------------------------------------
# Export with logits


def export_logits(
    model: Any,
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    batch: int = 1,
    seq_len: int = 16,
    opset: int | None = None,
) -> Path:
    """Export a Hugging Face task model with output ``logits`` [B, L]; return the path.

    Inputs and axes follow :func:`fastonnx.export.export_encoder` (``input_ids``,
    ``attention_mask``, ``token_type_ids`` when the model uses them; B and S dynamic).
    """
    require_torch()
    from fastonnx.export import export_encoder

    return export_encoder(
        model, path, dynamo=dynamo, batch=batch, seq_len=seq_len, opset=opset, output=LOGITS
    )


def has_task_head(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face task model (a head on a base model)."""
    base = getattr(model, "base_model", model)
    return base is not model


def resolve_output(model: Any, output: str) -> str:
    """``"logits"`` or ``"last_hidden_state"``; ``"auto"`` is logits for a task model."""
    if output == "auto":
        return LOGITS if has_task_head(model) else HIDDEN
    if output not in (LOGITS, HIDDEN):
        raise ValueError(f"unknown output {output!r}; choose logits, last_hidden_state or auto")
    return output


def export_model(
    model: Any,
    path: str | os.PathLike,
    *,
    output: str = "auto",
    dynamo: bool = True,
    fallback: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, str]:
    """Export with the dynamo exporter, falling back to the legacy one when it fails (and
    ``fallback`` is set). ``output``: ``"logits"``, ``"last_hidden_state"`` or ``"auto"``
    (logits for a task model). Returns (path, the exporter used)."""
    require_transformers("exporting a model")
    from fastonnx.export import export_encoder

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    output = resolve_output(model, output)
    export = export_logits if output == LOGITS else export_encoder
    if not dynamo:
        return export(model, path, dynamo=False), "legacy"
    try:
        return export(model, path, dynamo=True), "dynamo"
    except Exception as exc:  # noqa: BLE001 - torch.export raises many unrelated types
        if not fallback:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log(f"dynamo export failed ({type(exc).__name__}: {first}); retrying with dynamo=False")
    return export(model, path, dynamo=False), "legacy"


# --------------------------------------------------------------------------------------------
# The sparsity check


@dataclass(frozen=True)
class OnnxLayerSparsity:
    """A pruned layer found in the ONNX file, measured there."""

    layer: str  # the PyTorch module name
    tensor: str  # the ONNX initializer (or Constant output) holding its weight
    transposed: bool  # stored as [K, N] (MatMul layout) rather than [N, K]
    measured: LayerSparsity  # block sparsity of the ONNX tensor, in [N, K] layout


@dataclass
class PrunedExport:
    path: Path
    exporter: str
    output: str
    layers: list[OnnxLayerSparsity] = field(default_factory=list)

    def report(self) -> str:
        header = f"{self.path} ({self.exporter} exporter, output {self.output})"
        return header + "\n" + format_report(x.measured for x in self.layers)


def _fingerprint(array: np.ndarray) -> str:
    # + 0.0 turns -0.0 into 0.0: the same zero must hash the same whatever its sign.
    data = np.ascontiguousarray(array.astype(np.float32, copy=False) + np.float32(0.0))
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest() + str(data.shape)


def _onnx_matrices(path: Path) -> dict[str, np.ndarray]:
    """Every 2-D float constant of the main graph, by name."""
    proto = onnx.load(path)  # with external data
    tensors = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    matrices = {}
    for name, tensor in tensors.items():
        if len(tensor.dims) == 2 and tensor.data_type == onnx.TensorProto.FLOAT:
            matrices[name] = numpy_helper.to_array(tensor)
    return matrices


def check_onnx_sparsity(
    path: str | os.PathLike, weights: dict[str, Any], block_shape: Sequence[int]
) -> list[OnnxLayerSparsity]:
    """Find each weight W [N, K] (torch tensor or array, by layer name) in the ONNX file at
    ``path`` and measure its block sparsity there; raise :class:`SparsityCheckError` when one
    is missing or its zero blocks differ from W's."""
    block: BlockShape = (int(block_shape[0]), int(block_shape[1]))
    matrices = _onnx_matrices(Path(path))
    by_print: dict[str, tuple[str, bool]] = {}
    for name, matrix in matrices.items():
        by_print.setdefault(_fingerprint(matrix), (name, False))
        by_print.setdefault(_fingerprint(matrix.T), (name, True))
    found, missing = [], []
    for layer, weight in weights.items():
        w = weight.detach().cpu().float().numpy() if hasattr(weight, "detach") else weight
        hit = by_print.get(_fingerprint(np.asarray(w, dtype=np.float32)))
        if hit is None:
            missing.append(f"{layer} {list(w.shape)}")
            continue
        expected = measure(layer, w, block)
        # Same values, so the same sparsity; measured again from the file all the same, so the
        # report is what the ONNX file holds.
        onnx_w = matrices[hit[0]]
        measured = measure(layer, onnx_w.T if hit[1] else onnx_w, block)
        if measured.zero_blocks != expected.zero_blocks:
            raise SparsityCheckError(
                f"{path}: {layer} has {measured.zero_blocks} zero {block[0]}x{block[1]} blocks "
                f"in ONNX tensor {hit[0]}, {expected.zero_blocks} in the model"
            )
        found.append(OnnxLayerSparsity(layer, hit[0], hit[1], measured))
    if missing:
        raise SparsityCheckError(
            f"{path}: {len(missing)} pruned weight(s) not found among the ONNX constants "
            f"(changed by the export?): {', '.join(missing[:5])}"
            + (", ..." if len(missing) > 5 else "")
        )
    return found


def export_pruned(
    model: Any,
    path: str | os.PathLike,
    pruner: BlockPruner | None = None,
    *,
    block_shape: Sequence[int] | str | None = None,
    target: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
    output: str = "auto",
    dynamo: bool = True,
    fallback: bool = True,
    log: Callable[[str], None] | None = None,
) -> PrunedExport:
    """Export ``model`` (see :func:`export_model`) and check its block sparsity in the file.

    The layers checked are ``pruner``'s, or else those :func:`select_linear_layers` picks with
    ``include``/``exclude``, measured in ``pruner``'s block shape or ``block_shape`` (default:
    the one ``target`` prefers).
    """
    if pruner is not None:
        block, weights = pruner.block_shape, pruner.weights()
    else:
        block = resolve_block_shape(block_shape, target)
        modules = select_linear_layers(model, include, exclude)
        weights = {name: module.weight for name, module in modules.items()}
    out_path, exporter = export_model(
        model, path, output=output, dynamo=dynamo, fallback=fallback, log=log
    )
    layers = check_onnx_sparsity(out_path, weights, block)
    return PrunedExport(out_path, exporter, resolve_output(model, output), layers)
