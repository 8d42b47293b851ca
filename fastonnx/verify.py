"""Check an optimized model against its input: same sample inputs, both in ORT, compare outputs.

The optimized model runs with fastonnx's custom-op library registered only when it contains
``com.fastonnx`` ops, so an ``int8`` output is checked exactly as a vanilla ORT user would run it.

Also reports which kernels ORT ends up running the quantized linear layers with (its graph after
its own optimizations): int8 kernels, or float MatMul/Gemm on dequantized weights.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from fastonnx.model_io import InputError, ModelRunError, domains_used, ort_session
from fastonnx.runtime import OP_DOMAIN


@dataclass(frozen=True)
class Tolerance:
    """Pass when every output's worst per-sample cosine >= ``min_cosine`` and, when set,
    ``max abs diff <= max_rel_diff * max |reference|``.

    Classifier logits (an output whose last axis has at most ``LOGITS_MAX_CLASSES`` entries) are
    judged by their normalized RMS error instead, ``rms(candidate - reference) / std(reference)``
    over all samples, against ``max_logits_nrmse``: a per-sample cosine of two or three logits
    swings wildly on rows near zero while the predictions do not move."""

    min_cosine: float
    max_rel_diff: float | None = None
    max_logits_nrmse: float = 0.1


LOGITS_MAX_CLASSES = 16

# Fusions reorder float math only; int8 loses about 2 significant digits per layer.
TOLERANCES: dict[str, Tolerance] = {
    "fuse": Tolerance(min_cosine=0.9999, max_rel_diff=1e-3, max_logits_nrmse=1e-3),
    "int8": Tolerance(min_cosine=0.99),
    "sparse-int8": Tolerance(min_cosine=0.99),
}

# ORT ops that run a linear layer in int8 (com.fastonnx ops count as int8 too).
INT8_LINEAR_OPS = {
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
}


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs_diff: float
    max_abs_reference: float
    min_cosine: float  # worst sample
    mean_cosine: float
    logits: bool = False  # judged as classifier logits (see Tolerance)
    nrmse: float = 0.0  # rms(candidate - reference) / std(reference), all samples
    argmax_agree: int = 0  # rows whose top class agrees (logits only)
    rows: int = 0

    def passes(self, tolerance: Tolerance) -> bool:
        if self.logits:
            return self.nrmse <= tolerance.max_logits_nrmse  # also catches NaN
        if not self.min_cosine >= tolerance.min_cosine:  # also catches NaN
            return False
        if tolerance.max_rel_diff is None:
            return True
        return self.max_abs_diff <= tolerance.max_rel_diff * max(self.max_abs_reference, 1e-6)


@dataclass
class VerifyResult:
    outputs: list[OutputComparison]
    tolerance: Tolerance
    num_samples: int
    kernels: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passes(self.tolerance) for o in self.outputs)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def session_options_for(model: ir.Model):
    """ORT session options; with fastonnx's ops registered when ``model`` uses them."""
    import onnxruntime as ort

    if OP_DOMAIN not in domains_used(model):
        so = ort.SessionOptions()
    else:
        from fastonnx.runtime import session_options

        try:
            so = session_options()
        except (ImportError, FileNotFoundError) as exc:
            raise InputError(
                f"the optimized model uses {OP_DOMAIN} ops but fastonnx's custom-op library "
                f"is not available ({exc})"
            ) from exc
    so.log_severity_level = 3
    return so


def compare_models(
    reference: ir.Model,
    candidate: ir.Model,
    samples: Sequence[Mapping[str, np.ndarray]],
    tolerance: Tolerance,
) -> VerifyResult:
    """Run both models on ``samples`` and compare each output of ``candidate`` by name.

    Outputs a packed candidate restores with UnpackTokens are exactly 0 at padded positions by
    contract (docs/operators.md); they are compared at the valid positions only (the
    reference's padded positions are zeroed too).
    """
    if not samples:
        raise ValueError("verification needs at least one sample")
    unpacked = unpacked_outputs(candidate)
    cosines: dict[str, list[float]] = collections.defaultdict(list)
    max_diff: dict[str, float] = collections.defaultdict(float)
    max_ref: dict[str, float] = collections.defaultdict(float)
    refs: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    cands: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    with (
        ort_session(
            reference, session_options_for(reference), what="the reference model"
        ) as ref_session,
        ort_session(
            candidate, session_options_for(candidate), what="the optimized model"
        ) as cand_session,
    ):
        names = [o.name for o in cand_session.get_outputs()]
        ref_names = {o.name for o in ref_session.get_outputs()}
        missing = [n for n in names if n not in ref_names]
        if missing:
            raise InputError(f"the reference model has no output(s) named {missing}")
        for sample in samples:
            ref_out = _run(ref_session, names, sample, "the reference model")
            cand_out = _run(cand_session, names, sample, "the optimized model")
            for name, a, b in zip(names, ref_out, cand_out, strict=True):
                a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
                if name in unpacked and a64.shape == b64.shape:
                    a64 = a64 * (np.asarray(sample[unpacked[name]]) != 0)[..., None]
                if a64.shape != b64.shape:
                    raise InputError(
                        f"output '{name}' has shape {list(b64.shape)}, reference {list(a64.shape)}"
                    )
                cosines[name].append(_cosine(a64, b64))
                if _is_logits(a64):
                    refs[name].append(a64.reshape(-1, a64.shape[-1]))
                    cands[name].append(b64.reshape(-1, b64.shape[-1]))
                if a64.size:
                    max_diff[name] = max(max_diff[name], float(np.abs(a64 - b64).max()))
                    max_ref[name] = max(max_ref[name], float(np.abs(a64).max()))
    outputs = [
        OutputComparison(
            name=n,
            max_abs_diff=max_diff[n],
            max_abs_reference=max_ref[n],
            min_cosine=min(cosines[n]),
            mean_cosine=float(np.mean(cosines[n])),
            **(_logits_fields(refs[n], cands[n]) if refs[n] else {}),
        )
        for n in names
    ]
    return VerifyResult(outputs, tolerance, len(samples))


def unpacked_outputs(model: ir.Model) -> dict[str, str]:
    """Output name -> the mask input name, for outputs of com.fastonnx::UnpackTokens."""
    out = {}
    for value in model.graph.outputs:
        node = value.producer()
        if node is not None and node.op_type == "UnpackTokens" and node.domain == OP_DOMAIN:
            mask = node.inputs[2]
            if mask is not None and mask.is_graph_input():
                out[value.name] = mask.name
    return out


def _is_logits(a: np.ndarray) -> bool:
    return a.ndim >= 2 and 0 < a.shape[-1] <= LOGITS_MAX_CLASSES


def _logits_fields(refs: list[np.ndarray], cands: list[np.ndarray]) -> dict:
    """Classifier-logit figures over all rows of all samples (each [rows, classes])."""
    ref, cand = np.concatenate(refs), np.concatenate(cands)
    spread = float(ref.std())
    err = float(np.sqrt(np.mean((cand - ref) ** 2)))
    nrmse = err / spread if spread > 0 else (0.0 if err == 0 else float("inf"))
    agree = int((ref.argmax(axis=-1) == cand.argmax(axis=-1)).sum())
    return {"logits": True, "nrmse": nrmse, "argmax_agree": agree, "rows": len(ref)}


def _run(session, names: list[str], sample: Mapping[str, np.ndarray], what: str) -> list:
    try:
        return session.run(names, dict(sample))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRunError(f"ONNX Runtime failed running {what} on a sample: {reason}") from exc


def verify_files(
    reference_path: str | os.PathLike,
    candidate_path: str | os.PathLike,
    samples: Sequence[Mapping[str, np.ndarray]],
    preset: str,
) -> VerifyResult:
    """:func:`compare_models` on two files, with the preset's tolerance and a kernel summary."""
    from fastonnx.model_io import load_model

    reference, candidate = load_model(reference_path), load_model(candidate_path)
    result = compare_models(reference, candidate, samples, TOLERANCES[preset])
    result.kernels = linear_kernels(candidate)
    return result


def linear_kernels(model: ir.Model) -> dict[str, int]:
    """How ORT runs the model's linear layers after its own graph optimizations.

    Counts ``int8`` (int8 kernels: MatMulIntegerToFloat, QGemm, ... and com.fastonnx ops),
    ``float on dequantized weights`` (a float MatMul/Gemm fed by a DequantizeLinear: a QDQ
    form ORT did not fuse) and ``float`` (other MatMul/Gemm with a constant weight), plus one
    entry per int8 op type.
    """
    with tempfile.TemporaryDirectory(prefix="fastonnx-opt-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        with ort_session(model, session_options_for(model), optimized_model_path=path):
            pass
        graph = onnx.load(path, load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = {t.name for t in graph.initializer}
    counts: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        if node.op_type in INT8_LINEAR_OPS or (
            node.domain == OP_DOMAIN and node.op_type.startswith("SparseLinear")
        ):
            counts["int8"] += 1
            counts[node.op_type] += 1
        elif node.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            feeds = [producers.get(name) for name in node.input[:2]]
            if any(p is not None and p.op_type == "DequantizeLinear" for p in feeds):
                counts["float on dequantized weights"] += 1
            elif len(node.input) > 1 and node.input[1] in constants:
                counts["float"] += 1
    return dict(counts)


def format_verify(result: VerifyResult) -> str:
    tol = result.tolerance
    lines = [
        f"verify ({result.num_samples} samples; tolerance: cosine >= {tol.min_cosine}"
        + (f", max abs diff <= {tol.max_rel_diff:g} x max |ref|" if tol.max_rel_diff else "")
        + ")"
    ]
    for o in result.outputs:
        status = "ok" if o.passes(tol) else "FAIL"
        if o.logits:
            lines.append(
                f"  {o.name} (classifier logits): normalized RMS error {o.nrmse:.4f} "
                f"(tolerance {tol.max_logits_nrmse:g}), top class agrees on {o.argmax_agree} of "
                f"{o.rows} rows, max abs diff {o.max_abs_diff:.3g}  {status}"
            )
            continue
        lines.append(
            f"  {o.name}: max abs diff {o.max_abs_diff:.3g} (max |ref| {o.max_abs_reference:.3g}),"
            f" cosine min {o.min_cosine:.6f} mean {o.mean_cosine:.6f}  {status}"
        )
    if result.kernels:
        k = result.kernels
        lines.append(
            f"  ORT kernels for linear layers: {k.get('int8', 0)} int8, "
            f"{k.get('float on dequantized weights', 0)} float on dequantized weights, "
            f"{k.get('float', 0)} float"
        )
    return "\n".join(lines)
