"""The variants `fastonnx bench MODEL.onnx` compares: how each model file is produced, and how
each is opened as a runner on a given number of threads.

1. ``ort-fp32``      ORT, the model as exported
2. ``ort-opt``       ORT after ORT's own transformer optimizer (``optimize_model``, bert)
3. ``ort-int8``      ORT dynamic int8 (``quantize_dynamic``) of variant 2's model
4. ``fastonnx-qdq``  fastonnx preset ``int8`` (QDQ), run in vanilla ORT (no fastonnx library)
5. ``fastonnx``      fastonnx preset ``sparse-int8``, run with fastonnx's custom-op library
   (packed execution where it applies: only the valid tokens are computed)
   ``fastonnx-padded`` the same with ``--no-packing``: every padded position computed
6. ``openvino``      OpenVINO on the exported model (its CPU default precision, often bf16)
   ``openvino-qdq``  OpenVINO on variant 4's QDQ model

Preparing a variant never raises: a failure (ORT's optimizer crashing, a model fastonnx cannot
optimize, a runtime not installed) is recorded on the variant, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class VariantSpec:
    key: str
    number: str  # the numbering of the comparison: "1" ... "6b"
    label: str
    runtime: str
    precision: str  # expected; OpenVINO's is read back from the compiled model


SPECS: tuple[VariantSpec, ...] = (
    VariantSpec("ort-fp32", "1", "ORT fp32 (as exported)", "onnxruntime", "fp32"),
    VariantSpec("ort-opt", "2", "ORT fp32 + ORT optimizer", "onnxruntime", "fp32"),
    VariantSpec("ort-int8", "3", "ORT dynamic int8", "onnxruntime", "int8 dynamic"),
    VariantSpec("fastonnx-qdq", "4", "fastonnx int8 QDQ in ORT", "onnxruntime", "int8 static"),
    VariantSpec("fastonnx", "5", "fastonnx sparse-int8", "onnxruntime+fastonnx", "int8 sparse"),
    VariantSpec(
        "fastonnx-padded",
        "5p",
        "fastonnx sparse-int8, padded",
        "onnxruntime+fastonnx",
        "int8 sparse",
    ),
    VariantSpec("openvino", "6a", "OpenVINO", "openvino", "CPU default"),
    VariantSpec("openvino-qdq", "6b", "OpenVINO on QDQ model", "openvino", "int8 QDQ"),
)
SPEC_BY_KEY = {s.key: s for s in SPECS}
# Run unless --variants says otherwise: padded fastonnx only where padding is timed (--texts),
# or when asked (on full-length inputs it shows what packing costs when there is no padding).
DEFAULT_KEYS = tuple(s.key for s in SPECS if s.key != "fastonnx-padded")
REFERENCE_KEY = "ort-fp32"  # parity and the first speed-up ratio are against this one
INT8_REFERENCE_KEY = "ort-int8"  # the second speed-up ratio


class Runner:
    """One model opened on a runtime for a fixed thread count.

    ``bind(feed)`` adapts a feed once (input names and dtypes the model takes), outside any
    timed region; ``run(bound)`` runs it and returns every output, the first being the main one.
    """

    precision: str | None = None  # what the runtime says it computes in, when it says

    def bind(self, feed: Feed) -> object:
        raise NotImplementedError

    def run(self, bound: object) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the session now, so sessions of one setting do not outlive it."""


Opener = Callable[[int], Runner]


@dataclass
class Variant:
    spec: VariantSpec
    status: str = "ok"  # "ok", "failed" (error says why) or "skipped" (a runtime is absent)
    error: str | None = None
    model_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    prepare_seconds: float = 0.0
    precision: str | None = None
    open: Opener | None = None
    # For the ORT profiler: (model path, whether fastonnx's library is registered).
    ort_model: tuple[Path, bool] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, stage: str, exc: BaseException | str) -> None:
        self.status = "failed"
        self.error = f"{stage}: {error_text(exc)}"
        self.open = None


def error_text(exc: BaseException | str) -> str:
    """One readable line for an exception: ORT and OpenVINO errors span many lines."""
    if isinstance(exc, str):
        return exc
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # ORT prefixes "[ONNXRuntimeError] : 1 : FAIL : "; the useful part comes after.
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ")[-1]
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------------------------
# Runners


def ort_session_options(threads: int, *, fastonnx: bool, spin: bool, profile_prefix=None):
    import onnxruntime as ort

    if fastonnx:
        from fastonnx.runtime import session_options

        so = session_options(threads)
    else:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # "unused initializer" notices are noise here
    if spin:
        # Workers spin between the operators of a run (ORT's default), and stop as soon as the
        # run returns: interleaving runs several sessions in one process, and an idle
        # session's spinning workers would steal cores from the session timed next.
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        # Workers sleep between operators: each parallel section then pays a wake-up (tens
        # of microseconds, far more on some VMs), which short operators cannot amortize.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return so


_ORT_DTYPES = {  # ORT's type strings for the input types encoders take
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def ort_inputs(session) -> list[tuple[str, object]]:
    """(name, NumPy dtype or None when unknown) of an ORT session's inputs."""
    return [(i.name, _ORT_DTYPES.get(i.type)) for i in session.get_inputs()]


def adapt_feed(feed: Feed, inputs: Sequence[tuple[str, object]]) -> dict[str, np.ndarray]:
    """The arrays a model takes, by name, in the dtypes it declares.

    An optimizer may drop an unused input or retype one (int64 ids to int32), so each model gets
    its own copy of the shared inputs. A model input with no array is an error.
    """
    out = {}
    for name, dtype in inputs:
        if name not in feed:
            raise KeyError(f"the model takes input '{name}'; the benchmark has {sorted(feed)}")
        array = np.asarray(feed[name])
        out[name] = array.astype(dtype, copy=False) if dtype is not None else array
    return out


class OrtRunner(Runner):
    def __init__(self, path: Path, threads: int, *, fastonnx: bool, spin: bool) -> None:
        import onnxruntime as ort

        options = ort_session_options(threads, fastonnx=fastonnx, spin=spin)
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._inputs = ort_inputs(self._session)

    def bind(self, feed: Feed) -> object:
        return adapt_feed(feed, self._inputs)

    def run(self, bound: object) -> list[np.ndarray]:
        return self._session.run(None, bound)

    def close(self) -> None:
        self._session = None


class OpenVinoRunner(Runner):
    """One compiled model and one infer request: requests run one at a time, as ORT's do."""

    def __init__(self, core, path: Path, threads: int) -> None:
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._request = self._compiled.create_infer_request()
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self._inputs = [
            (port.any_name, port.get_element_type().to_dtype()) for port in self._compiled.inputs
        ]

    def bind(self, feed: Feed) -> object:
        return adapt_feed(feed, self._inputs)

    def run(self, bound: object) -> list[np.ndarray]:
        self._request.infer(bound)
        # Copies: the request's output buffers are reused by its next call.
        return [
            np.array(self._request.get_output_tensor(i).data)
            for i in range(len(self._compiled.outputs))
        ]

    def close(self) -> None:
        self._request = self._compiled = None


def ort_opener(path: Path, *, fastonnx: bool, spin: bool) -> Opener:
    return lambda threads: OrtRunner(path, threads, fastonnx=fastonnx, spin=spin)


# --------------------------------------------------------------------------------------------
# Preparing the model files


@contextlib.contextmanager
def quiet_logging():
    """Silence the Python warnings ORT's optimizer and quantizer log while they run: the
    benchmark reports what they did (fused op counts) itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@dataclass
class PrepareContext:
    """What preparing the variants needs, and the model files made so far."""

    model_path: Path
    out_dir: Path  # optimized models are written under it
    spin: bool
    calibration: object  # fastonnx.calibration.CalibrationData for variants 4 and 5
    fastonnx_model: Path | None = None  # given, already optimized (sparse-int8)
    qdq_model: Path | None = None  # given, already optimized (int8)
    padded_model: Path | None = None  # given, already optimized (sparse-int8 --no-packing)
    made: dict[str, Path | BaseException] = field(default_factory=dict)

    def file(self, suffix: str) -> Path:
        stem = self.model_path.name.removesuffix(".onnx")
        return self.out_dir / f"{stem}.{suffix}.onnx"

    def artifact(self, name: str, make: Callable[[], Path]) -> Path:
        """Make a model file once; a failure is remembered and raised again to dependents."""
        if name not in self.made:
            try:
                self.made[name] = make()
            except Exception as exc:  # noqa: BLE001 - recorded on the variant, never fatal
                self.made[name] = exc
        result = self.made[name]
        if isinstance(result, BaseException):
            raise result
        return result


def _ort_optimized(ctx: PrepareContext, notes: list[str]) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    path = ctx.file("ort-opt")
    with quiet_logging():
        # num_heads / hidden_size 0: the optimizer reads them from the graph.
        optimized = optimize_model(
            str(ctx.model_path), model_type="bert", num_heads=0, hidden_size=0
        )
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    notes.append(
        "ORT optimizer fused: " + (", ".join(f"{k} {v}" for k, v in stats.items()) or "nothing")
    )
    if stats and not any("Attention" in k for k in stats):
        notes.append("ORT optimizer: attention not fused")
    optimized.save_model_to_file(str(path), use_external_data_format=False)
    return path


def _ort_int8(ctx: PrepareContext, source: Path) -> Path:
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    path = ctx.file("ort-int8")
    # ORT's optimizer can leave value_info that contradicts re-inferred shapes (seen on
    # classifier heads: "Inferred shape and existing shape differ"); the quantizer re-infers
    # them, so start it from a model without them.
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    cleaned = path.with_name(path.stem + ".input.onnx")
    onnx.save(model, str(cleaned))
    with quiet_logging():
        # A fused model has com.microsoft ops whose outputs have no inferred type; the quantizer
        # needs a default element type for them.
        quantize_dynamic(
            str(cleaned),
            str(path),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    cleaned.unlink()
    return path


def _fastonnx_optimized(
    ctx: PrepareContext, preset: str, notes: list[str], *, packing: bool = True
) -> Path:
    from fastonnx.optimizer import optimize

    result = optimize(ctx.model_path, preset=preset, calibration=ctx.calibration, packing=packing)
    report = result.report
    if not report.changed:
        reason = "; ".join(report.notes) or "no pass changed the model"
        raise ValueError(f"fastonnx optimize ({preset}): {reason}")
    if not report.quantized:
        raise ValueError(f"fastonnx optimize ({preset}) quantized no linear layer")
    notes.append(f"{len(report.quantized)} linear layers int8; calibration: {report.calibration}")
    notes.extend(report.notes)  # the optimizer's own warnings (synthesized calibration...)
    if preset == "sparse-int8":
        lowered = len(report.lowered)
        notes.append(
            f"{lowered} of {len(report.quantized)} layers on fastonnx sparse kernels"
            + ("" if lowered else " (weights not sparse enough; the rest run on ORT int8)")
        )
    path = ctx.file(preset if packing else f"{preset}-padded")
    given = [p for p in (ctx.fastonnx_model, ctx.qdq_model, ctx.padded_model) if p is not None]
    result.save(path, protect=given)  # never overwrite a model the user passed in
    return path


def _given(path: Path, what: str, notes: list[str]) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    notes.append(f"given: {path}")
    return path


def _prepare_ort(ctx: PrepareContext, variant: Variant) -> None:
    key, notes = variant.spec.key, variant.notes
    if key == "ort-fp32":
        path = ctx.model_path
    elif key == "ort-opt":
        path = ctx.artifact("ort-opt", lambda: _ort_optimized(ctx, notes))
    elif key == "ort-int8":
        try:
            source = ctx.artifact("ort-opt", lambda: _ort_optimized(ctx, []))
        except Exception as exc:  # noqa: BLE001 - said in the notes, not hidden
            notes.append(
                f"ORT optimizer failed ({error_text(exc)}); quantized the exported model instead"
            )
            source = ctx.model_path
        path = ctx.artifact("ort-int8", lambda: _ort_int8(ctx, source))
    elif key == "fastonnx-qdq":
        path = ctx.artifact("int8", lambda: _qdq_model(ctx, notes))
    elif key == "fastonnx-padded" and ctx.padded_model is not None:
        path = _given(ctx.padded_model, "--fastonnx-padded-model", notes)
    elif key == "fastonnx-padded":
        path = ctx.artifact(
            "sparse-int8-padded",
            lambda: _fastonnx_optimized(ctx, "sparse-int8", notes, packing=False),
        )
    else:  # "fastonnx"
        if ctx.fastonnx_model is not None:
            path = _given(ctx.fastonnx_model, "--fastonnx-model", notes)
        else:
            path = ctx.artifact(
                "sparse-int8", lambda: _fastonnx_optimized(ctx, "sparse-int8", notes)
            )
    with_library = key in ("fastonnx", "fastonnx-padded")
    if with_library:
        from fastonnx.runtime import get_library_path

        get_library_path()  # a missing library fails here, in the variant's row
    variant.model_path = path
    variant.ort_model = (path, with_library)
    variant.open = ort_opener(path, fastonnx=with_library, spin=ctx.spin)


def _qdq_model(ctx: PrepareContext, notes: list[str]) -> Path:
    if ctx.qdq_model is not None:
        return _given(ctx.qdq_model, "--qdq-model", notes)
    return _fastonnx_optimized(ctx, "int8", notes)


def _prepare_openvino(ctx: PrepareContext, variant: Variant) -> None:
    try:
        import openvino
    except ImportError:
        variant.status = "skipped"
        variant.error = "OpenVINO is not installed (pip install openvino)"
        return
    if variant.spec.key == "openvino":
        path = ctx.model_path
    else:
        try:
            path = ctx.artifact("int8", lambda: _qdq_model(ctx, []))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"no QDQ model (variant 4 failed: {error_text(exc)})") from exc
    core = openvino.Core()
    variant.model_path = path
    variant.notes.append(
        "precision: the compiled model's INFERENCE_PRECISION_HINT (OpenVINO's CPU default)"
    )
    variant.open = lambda threads: OpenVinoRunner(core, path, threads)


def prepare(ctx: PrepareContext, keys: Sequence[str], progress=None) -> list[Variant]:
    """Produce every variant's model file; failures are recorded per variant, in order."""
    variants = []
    for i, key in enumerate(keys):
        variant = Variant(SPEC_BY_KEY[key], precision=SPEC_BY_KEY[key].precision)
        if progress:
            progress(i, len(keys), variant, done=False)
        start = time.perf_counter()
        try:
            if variant.spec.runtime == "openvino":
                _prepare_openvino(ctx, variant)
            else:
                _prepare_ort(ctx, variant)
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not end the run
            variant.fail("prepare", exc)
        variant.prepare_seconds = time.perf_counter() - start
        variants.append(variant)
        if progress:
            progress(i + 1, len(keys), variant, done=True)
    return variants
