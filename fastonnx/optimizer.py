"""The optimize pipeline: presets of passes, run in order, each reporting what it changed.

Presets:

* ``fuse`` — clean-up (fold constants, simplify shapes) and encoder fusions (attention into
  MultiHeadAttention, LayerNorm, SkipLayerNormalization, Gelu / BiasGelu): both are
  :func:`fastonnx.passes.fusion.fuse_encoder`.
* ``int8`` — ``fuse``, then static INT8 quantization of the linear layers in QDQ form (runs in
  vanilla ONNX Runtime, which executes it with its own int8 kernels).
* ``sparse-int8`` — ``int8``, then linear layers whose weights are sparse enough become
  fastonnx's sparse INT8 op, and self-attention becomes fastonnx's Attention op (with the Q/K/V
  projections of a block merged into one layer where they are all sparse); the output then
  needs fastonnx's custom-op library. Then, where the model allows it (a pure key-padding
  mask, per-token ops only between the embeddings and the outputs), the encoder runs on the
  valid tokens only (packed execution, :mod:`fastonnx.passes.pack_tokens`; ``packing=False``
  turns it off): outputs are zero at padded positions.

A model without a transformer-encoder pattern is returned unchanged, with a note saying so.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from fastonnx import calibration as calib
from fastonnx.model_io import (
    InputError,
    as_model,
    external_data_files,
    save_model,
    weights_nbytes,
)
from fastonnx.passes.base import Pass, Report, Skip
from fastonnx.passes.quantize_qdq import QuantizeConfig, QuantizedLayer

PRESETS: dict[str, tuple[str, ...]] = {
    "fuse": ("fuse",),  # fuse_encoder runs the clean-up itself
    "int8": ("fuse", "quantize", "ort_int8_range"),
    "sparse-int8": (
        "fuse",
        "quantize",
        "lower_sparse",
        "ort_int8_range",
        "lower_attention",
        "lower_layer_norm",
        "pack_tokens",
    ),
}
DEFAULT_PRESET = "sparse-int8"

# Ops that mark a transformer encoder (attention or normalization), fused or not.
_ENCODER_MARKERS = {
    ("", "Softmax"),
    ("", "LayerNormalization"),
    ("com.microsoft", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "SkipLayerNormalization"),
    ("com.microsoft", "EmbedLayerNormalization"),
}

CalibrationLike = (
    calib.CalibrationData | Sequence[Mapping[str, np.ndarray]] | str | os.PathLike | None
)


class OptimizeError(InputError):
    """The pipeline cannot run as asked (unknown preset, a pass missing from this build...)."""


@dataclass
class PassRecord:
    """One pass's outcome: its counts, its time, and its report."""

    name: str
    counts: dict[str, int]
    seconds: float
    details: Report


@dataclass
class OptimizeReport:
    preset: str
    passes: list[PassRecord] = field(default_factory=list)
    weights_bytes_before: int = 0
    weights_bytes_after: int = 0
    changed: bool = False
    calibration: str | None = None  # where the calibration samples came from
    notes: list[str] = field(default_factory=list)

    def details(self, name: str) -> Any:
        return next((p.details for p in self.passes if p.name == name), None)

    @property
    def quantized(self) -> list[QuantizedLayer]:
        q = self.details("quantize")
        return list(q.quantized) if q is not None else []

    @property
    def quantize_skipped(self) -> list[Skip]:
        q = self.details("quantize")
        return list(q.skipped) if q is not None else []

    @property
    def lowered(self) -> list[Any]:
        """Layers the sparse lowering replaced (its report's ``lowered`` entries)."""
        sparse = self.details("lower_sparse")
        return list(sparse.lowered) if sparse is not None else []

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""

        def plain(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}
            if isinstance(obj, Mapping):
                return {str(k): plain(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return [plain(v) for v in obj]
            if isinstance(obj, np.generic):
                return obj.item()
            if obj is None or isinstance(obj, str | int | float | bool):
                return obj
            return str(obj)

        return plain(self)


@dataclass
class OptimizeResult:
    model: ir.Model
    report: OptimizeReport
    source_files: list[Path] = field(default_factory=list)  # the input and its data files

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Save the optimized model atomically (see :func:`fastonnx.model_io.save_model`).

        Refuses to overwrite the input model or its external data files.
        """
        protect = [*self.source_files, *kwargs.pop("protect", ())]
        return save_model(self.model, path, protect=protect, **kwargs)


def encoder_pattern_problem(model: ir.Model) -> str | None:
    """Why this does not look like a transformer encoder, or None when it does.

    An encoder has linear layers (MatMul/Gemm with a constant 2-D weight) and attention or
    normalization ops (Softmax, LayerNormalization, or their com.microsoft fused forms).
    """
    ops = {(n.domain, n.op_type) for n in model.graph}
    has_linear = any(
        n.domain == ""
        and n.op_type in ("MatMul", "Gemm")
        and len(n.inputs) > 1
        and (w := ir.convenience.get_const_tensor(n.inputs[1])) is not None
        and len(w.shape) == 2
        for n in model.graph
    )
    has_marker = bool(ops & _ENCODER_MARKERS)
    if has_linear and has_marker:
        return None
    missing = []
    if not has_linear:
        missing.append("no linear layers (MatMul/Gemm with a constant weight)")
    if not has_marker:
        missing.append("no attention or LayerNorm (Softmax, LayerNormalization)")
    return "no transformer encoder pattern found: " + ", ".join(missing)


# --------------------------------------------------------------------------------------------
# Passes, imported lazily so each preset needs only what it runs


@dataclass
class _Context:
    """What the passes of one run share."""

    preset: str
    samples: list[Mapping[str, np.ndarray]]
    quantize_config: QuantizeConfig
    min_sparsity: float | None
    dynamic_activations: bool = True
    packing: bool = True
    length_config: Sequence[float] | None = None  # token dropping (sparse-int8, packed)


# The module each step needs. They are imported before the first pass runs, so a build without
# one (the sparse lowering needs the native extension) fails at once, not after calibration.
_PASS_MODULES = {
    "fuse": "fastonnx.passes.fusion",
    "quantize": "fastonnx.passes.quantize_qdq",
    "lower_sparse": "fastonnx.passes.lower_sparse",
    "ort_int8_range": "fastonnx.passes.ort_int8_range",
    "lower_attention": "fastonnx.passes.lower_attention",
    "lower_layer_norm": "fastonnx.passes.lower_layer_norm",
    "pack_tokens": "fastonnx.passes.pack_tokens",
}


def require_passes(preset: str) -> None:
    """Raise :class:`OptimizeError` when this build lacks a module the preset needs."""
    for step in PRESETS[preset]:
        try:
            importlib.import_module(_PASS_MODULES[step])
        except ModuleNotFoundError as exc:
            # Only a missing fastonnx module is a build problem; anything else is a bug.
            if not (exc.name or "").startswith("fastonnx"):
                raise
            native = step.startswith("lower_") or step == "pack_tokens"
            hint = "; use --preset int8" if native else ""
            raise OptimizeError(
                f"preset '{preset}' needs {exc.name}, which this fastonnx build lacks{hint}"
            ) from exc


def _fuse(ctx: _Context) -> Pass:
    from fastonnx.passes.fusion import FusePass

    # With sparse lowering, residual Adds fold into SparseLinear and LayerNormalization stays
    # alone: ORT 1.31's SkipLayerNormalization takes ~210 us at 128x384 on this CPU, against
    # ~23 us for LayerNormalization (measured side by side), so not fusing it is faster.
    return FusePass(skip_layer_norm="lower_sparse" not in PRESETS[ctx.preset])


def _quantize(ctx: _Context) -> Pass:
    from fastonnx.passes.quantize_qdq import QuantizePass

    return QuantizePass(ctx.samples, ctx.quantize_config)


def _lower_sparse(ctx: _Context) -> Pass:
    from fastonnx.passes.lower_sparse import LowerSparsePass

    return LowerSparsePass(ctx.min_sparsity, ctx.dynamic_activations)


def _ort_int8_range(ctx: _Context) -> Pass:
    from fastonnx.passes.ort_int8_range import OrtInt8RangePass

    return OrtInt8RangePass()


def _lower_attention(ctx: _Context) -> Pass:
    from fastonnx.passes.lower_attention import LowerAttentionPass

    return LowerAttentionPass()


def _lower_layer_norm(ctx: _Context) -> Pass:
    from fastonnx.passes.lower_layer_norm import LowerLayerNormPass

    return LowerLayerNormPass()


def _pack_tokens(ctx: _Context) -> Pass:
    from fastonnx.passes.pack_tokens import PackTokensPass

    return PackTokensPass(enabled=ctx.packing)


# Each step of a preset, configured from the run's options.
_PASS_FACTORIES: dict[str, Callable[[_Context], Pass]] = {
    "fuse": _fuse,
    "quantize": _quantize,
    "lower_sparse": _lower_sparse,
    "ort_int8_range": _ort_int8_range,
    "lower_attention": _lower_attention,
    "lower_layer_norm": _lower_layer_norm,
    "pack_tokens": _pack_tokens,
}


def build_passes(ctx: _Context) -> list[Pass]:
    """The run's preset as a list of configured passes (token dropping last, when asked)."""
    passes = [_PASS_FACTORIES[step](ctx) for step in PRESETS[ctx.preset]]
    if ctx.length_config is not None:
        from fastonnx.passes.drop_tokens import DropTokensPass

        passes.append(DropTokensPass(ctx.length_config))
    return passes


# --------------------------------------------------------------------------------------------
# The API


def resolve_calibration(
    model: ir.Model, calibration: CalibrationLike, num_samples: int | None = None
) -> calib.CalibrationData:
    """Calibration samples from what the caller gave (see :func:`optimize`)."""
    if isinstance(calibration, calib.CalibrationData):
        data = calibration
    elif calibration is None:
        return calib.load_calibration(model, num_samples=num_samples)
    elif isinstance(calibration, str | os.PathLike):
        return calib.from_npz(calibration, model, num_samples=num_samples)
    else:
        data = calib.CalibrationData([dict(s) for s in calibration], source="samples given")
    if not data.samples:
        raise calib.CalibrationError("no calibration samples given")
    if num_samples is not None:
        data = dataclasses.replace(data, samples=data.samples[:num_samples])
    return data


def optimize(
    model_or_path: ir.Model | onnx.ModelProto | str | os.PathLike,
    *,
    preset: str = DEFAULT_PRESET,
    calibration: CalibrationLike = None,
    num_samples: int | None = None,
    quantize_config: QuantizeConfig | None = None,
    min_sparsity: float | None = None,
    dynamic_activations: bool = True,
    packing: bool = True,
    length_config: Sequence[float] | None = None,
) -> OptimizeResult:
    """Optimize a transformer encoder for ONNX Runtime on CPUs.

    ``model_or_path``: a path (loaded with its external data), an ``onnx.ModelProto``, or an
    ``onnx_ir.Model`` (modified in place). ``calibration`` (int8 presets): a
    :class:`~fastonnx.calibration.CalibrationData`, a list of input feeds, a path to an ``.npz``
    file, or None to synthesize token inputs (with a printed warning). ``num_samples`` caps the
    samples used. ``dynamic_activations`` (sparse-int8, default on): lowered layers quantize
    their input per row at run time instead of with the calibrated per-tensor scale (more
    accurate on real models with activation outliers; ``False`` keeps the QDQ model's exact
    quantization). ``packing`` (sparse-int8, default on): run the encoder on the valid tokens
    only where the model allows it (outputs then exactly 0 at padded positions; the report says
    whether it applied and why not). ``length_config`` (sparse-int8, packed models): the share
    of its tokens each layer but the last hands to the next, the rest dropped by the attention
    they received (:mod:`fastonnx.passes.drop_tokens`; None, the default: full length). Returns
    the model and a report; save with ``result.save(path)``.
    """
    if preset not in PRESETS:
        raise OptimizeError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise OptimizeError(f"min_sparsity must be between 0 and 1, got {min_sparsity}")
    if num_samples is not None and num_samples < 1:
        raise OptimizeError(f"num_samples must be >= 1, got {num_samples}")
    if length_config is not None and "pack_tokens" not in PRESETS[preset]:
        raise OptimizeError(f"length_config needs the sparse-int8 preset, not '{preset}'")
    model = as_model(model_or_path)
    sources = []
    if isinstance(model_or_path, str | os.PathLike):
        sources = [Path(model_or_path), *external_data_files(model_or_path)]
    report = OptimizeReport(preset=preset, weights_bytes_before=weights_nbytes(model))
    report.weights_bytes_after = report.weights_bytes_before

    problem = encoder_pattern_problem(model)
    if problem is not None:
        report.notes.append(f"{problem}; model left unchanged")
        return OptimizeResult(model, report, sources)

    require_passes(preset)
    steps = PRESETS[preset]
    samples: list[Mapping[str, np.ndarray]] = []
    if "quantize" in steps:
        # Before any pass: synthesizing reads the embedding table, which fusions may rewrite.
        data = resolve_calibration(model, calibration, num_samples)
        samples = data.samples
        report.calibration = f"{len(data.samples)} samples from {data.source}"
        if data.synthetic:
            report.notes.append(
                "calibrated on synthesized token inputs; real sentences give better ranges"
            )
    ctx = _Context(
        preset,
        samples,
        quantize_config or QuantizeConfig(),
        min_sparsity,
        dynamic_activations,
        packing,
        length_config,
    )

    for pass_ in build_passes(ctx):
        start = time.perf_counter()
        result = pass_(model)
        details = result.report
        report.passes.append(
            PassRecord(pass_.name, details.counts, time.perf_counter() - start, details)
        )
        report.notes.extend(details.notes)
        if pass_.name in ("pack_tokens", "drop_tokens"):
            report.notes.append(details.format())

    report.weights_bytes_after = weights_nbytes(model)
    report.changed = any(record.details.changed for record in report.passes)
    if not report.passes[0].details.fused:
        report.notes.append("no fusion matched; attention and LayerNorm stay unfused")
    return OptimizeResult(model, report, sources)
