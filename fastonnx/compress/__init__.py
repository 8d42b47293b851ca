"""Upstream compression in PyTorch: hardware-aware block pruning and knowledge distillation.

Needs the ``[train]`` extra (torch, transformers), imported only when a function needs it, so
``import fastonnx.compress`` works on an inference-only install.

* :mod:`~fastonnx.compress.pruning` — :class:`BlockPruner`, :func:`prune_once`, block shapes;
* :mod:`~fastonnx.compress.schedule` — :class:`CubicSchedule` (Zhu & Gupta gradual pruning);
* :mod:`~fastonnx.compress.distill` — :func:`distillation_loss`, :func:`train`;
* :mod:`~fastonnx.compress.export` — :func:`export_pruned` (ONNX + sparsity check).
"""

from __future__ import annotations

from fastonnx.compress.distill import DistillConfig, TrainResult, distillation_loss, train
from fastonnx.compress.export import (
    PrunedExport,
    SparsityCheckError,
    check_onnx_sparsity,
    export_logits,
    export_model,
    export_pruned,
)
from fastonnx.compress.pruning import (
    DEFAULT_EXCLUDE,
    TARGETS,
    BlockPruner,
    LayerSparsity,
    check_block_shape_divides,
    check_target,
    preferred_block_shape,
    prune_once,
    resolve_block_shape,
    select_linear_layers,
    supported_block_shapes,
)
from fastonnx.compress.schedule import CubicSchedule

__all__ = [
    "DEFAULT_EXCLUDE",
    "TARGETS",
    "BlockPruner",
    "CubicSchedule",
    "DistillConfig",
    "LayerSparsity",
    "PrunedExport",
    "SparsityCheckError",
    "TrainResult",
    "check_block_shape_divides",
    "check_onnx_sparsity",
    "check_target",
    "distillation_loss",
    "export_logits",
    "export_model",
    "export_pruned",
    "preferred_block_shape",
    "prune_once",
    "resolve_block_shape",
    "select_linear_layers",
    "supported_block_shapes",
    "train",
]
