"""The encoder fusion pipeline: clean-up, then every fusion in dependency order.

Order and why:

1. ``cleanup`` - the rules below match constant Reshape targets and consistent symbolic dims;
2. ``layer_norm`` - before skip_layer_norm, which matches a LayerNormalization op;
3. ``gelu`` - before bias_gelu, which matches a Gelu op;
4. ``attention`` - independent of the others; the Q/K/V projections stay MatMul + Add;
5. ``skip_layer_norm`` then ``bias_gelu`` - these absorb bias Adds (unless ``fold_bias=False``).

Whatever still looks like an unfused pattern afterwards (Softmax, Erf, ReduceMean) is reported
with a warning on the ``fastonnx.passes`` loggers; ``debug=True`` adds the closest attention
near misses with the reason each failed (:func:`fastonnx.passes.fuse_attention.explain_attention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from fastonnx.passes.base import Pass, Report
from fastonnx.passes.cleanup import cleanup
from fastonnx.passes.fuse_attention import fuse_attention
from fastonnx.passes.fuse_bias_gelu import fuse_bias_gelu
from fastonnx.passes.fuse_gelu import fuse_gelu
from fastonnx.passes.fuse_layer_norm import fuse_layer_norm
from fastonnx.passes.fuse_skip_layer_norm import fuse_skip_layer_norm

logger = logging.getLogger(__name__)

FUSIONS = ("attention", "layer_norm", "skip_layer_norm", "gelu", "bias_gelu")

# Ops that, left in a fused encoder, mean a fusion missed: op type -> the fusion to look at.
_LEFTOVER_HINTS = {
    "ReduceMean": "layer_norm (decomposed LayerNormalization not fused)",
    "Erf": "gelu (Erf-form GELU not fused)",
}


def _report_leftovers(model: ir.Model) -> None:
    for op_type, hint in _LEFTOVER_HINTS.items():
        left = sum(1 for node in model.graph if node.op_type == op_type and node.domain == "")
        if left:
            logger.warning("%d %s node(s) left after fusion: %s", left, op_type, hint)


def fuse_encoder(
    model: ir.Model,
    *,
    fold_bias: bool = True,
    skip_layer_norm: bool = True,
    debug: bool = False,
) -> dict[str, int]:
    """Clean and fuse a transformer encoder in place; return what changed.

    Returns one count per fusion (keys in :data:`FUSIONS`: how many times each fired) and the
    clean-up counts under ``cleanup.<name>``. ``fold_bias=False`` keeps every linear layer's
    bias as its own Add (no BiasGelu, no bias input on SkipLayerNormalization).
    ``skip_layer_norm=False`` leaves residual Add + LayerNormalization unfused, for the sparse
    lowering to fold the Add into SparseLinear. ``debug=True``
    logs the failure reasons of the closest attention matches when some attention is left.
    """
    counts: dict[str, int] = {}
    cleaned = cleanup(model)
    counts["layer_norm"] = fuse_layer_norm(model)
    counts["gelu"] = fuse_gelu(model)
    counts["attention"] = fuse_attention(model, debug=debug)
    counts["skip_layer_norm"] = (
        fuse_skip_layer_norm(model, fold_bias=fold_bias) if skip_layer_norm else 0
    )
    counts["bias_gelu"] = fuse_bias_gelu(model) if fold_bias else 0
    # One mask clamp/expand per layer computes the same thing: share it. Rewrites also leave
    # constants and initializers behind (old Reshape targets, scale scalars).
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    _report_leftovers(model)
    counts.update({f"cleanup.{name}": value for name, value in cleaned.items()})
    logger.info("fuse_encoder: %s", counts)
    return counts


@dataclass(kw_only=True)
class FusionReport(Report):
    """What :func:`fuse_encoder` returned: fusion counts and ``cleanup.<name>`` counts."""

    found: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.found)

    @property
    def fused(self) -> bool:
        """Whether any fusion (not only the clean-up) fired."""
        return any(v for k, v in self.found.items() if not k.startswith("cleanup."))


class FusePass(Pass):
    """:func:`fuse_encoder` as a configured pass."""

    name = "fuse"

    def __init__(self, skip_layer_norm: bool = True):
        super().__init__()
        self.skip_layer_norm = skip_layer_norm

    def run(self, model: ir.Model) -> FusionReport:
        return FusionReport(found=fuse_encoder(model, skip_layer_norm=self.skip_layer_norm))
