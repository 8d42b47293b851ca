"""`fastonnx bench MODEL.onnx`: one encoder, side by side on ORT, fastonnx and OpenVINO.

The run, in order:

1. **prepare** — produce each variant's model file (see :mod:`fastonnx.bench.variants`); a
   variant that cannot be produced is reported with its error, the others go on.
2. **check** — open each variant once (on the most threads asked for) and run the parity
   samples through it: cosine and max abs diff of its first output against variant 1's; with
   ``eval_data``, its accuracy too. A variant that fails to open or run stops here.
3. **time** — for each setting (batch 1 on each thread count, then each throughput batch on the
   most threads), open every variant's session first, then run them interleaved round by round
   (A B C A B C ...) after warm-up rounds, on the same inputs (fixed seed). Median and p90 per
   call; throughput is batch / median (one request at a time, no concurrent streams).
4. **profile** (optional) — ORT's profiler on fastonnx and on ORT's faster int8 variant.

Dimensions: B batch, S sequence length.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastonnx.bench.timing import Timing, time_interleaved
from fastonnx.bench.variants import (
    DEFAULT_KEYS,
    INT8_REFERENCE_KEY,
    REFERENCE_KEY,
    SPEC_BY_KEY,
    SPECS,
    PrepareContext,
    Runner,
    Variant,
    error_text,
    prepare,
)
from fastonnx.model_io import InputError

EVAL_BATCH = 16  # rows per call when scoring --eval-data


class BenchError(InputError):
    """Options or files the benchmark cannot use (reported without a traceback)."""


@dataclass
class BenchConfig:
    model: Path
    out_dir: Path = Path("bench-out")
    seq_len: int = 128
    threads: tuple[int, ...] = (1, 2)  # batch-1 latency is measured on each
    batch_sizes: tuple[int, ...] = (8,)  # throughput, on the most threads
    warmup: int = 5  # rounds before timing (every variant once per round)
    runs: int = 30  # timed rounds
    seed: int = 0
    variants: tuple[str, ...] = DEFAULT_KEYS
    calibration: Path | None = None  # .npz for variants 4/5; else synthesized token inputs
    num_samples: int = 16  # calibration samples
    parity_samples: int = 4
    fastonnx_model: Path | None = None  # already optimized: skip optimizing
    qdq_model: Path | None = None
    padded_model: Path | None = None  # already optimized with --no-packing (variant 5p)
    eval_data: Path | None = None  # .npz with the model inputs and `labels`
    profile: bool = False
    spin: bool = True  # ORT workers spin during runs (see variants.ort_session_options)
    chart: bool = True


@dataclass(frozen=True)
class Setting:
    batch: int
    threads: int

    @property
    def label(self) -> str:
        return f"b{self.batch} t{self.threads}"

    @property
    def title(self) -> str:
        return f"batch {self.batch}, {self.threads} thread{'s' if self.threads > 1 else ''}"


def settings_for(config: BenchConfig) -> list[Setting]:
    most = max(config.threads)
    wanted = [Setting(1, t) for t in config.threads]
    wanted += [Setting(b, most) for b in config.batch_sizes]
    return list(dict.fromkeys(wanted))  # drop repeats, keep order


@dataclass
class Measurement:
    setting: Setting
    timing: Timing | None = None
    error: str | None = None

    @property
    def throughput(self) -> float | None:
        """Sequences per second."""
        if self.timing is None:
            return None
        return self.setting.batch * 1000.0 / self.timing.median_ms


@dataclass
class Parity:
    output: str  # the first output's name in the reference
    samples: int
    cosine_min: float | None = None  # worst sample
    cosine_mean: float | None = None
    max_abs_diff: float | None = None
    error: str | None = None


@dataclass
class VariantResult:
    variant: Variant
    parity: Parity | None = None
    accuracy: float | None = None
    timings: dict[Setting, Measurement] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.variant.spec.key

    def median(self, setting: Setting) -> float | None:
        m = self.timings.get(setting)
        return m.timing.median_ms if m is not None and m.timing is not None else None


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict
    settings: list[Setting]
    results: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    profiles: list = field(default_factory=list)  # profile.OpProfile
    load_average_after: tuple[float, ...] = ()
    json_path: Path | None = None
    chart_path: Path | None = None

    def get(self, key: str) -> VariantResult | None:
        return next((r for r in self.results if r.key == key), None)

    def speedup(self, result: VariantResult, setting: Setting, reference_key: str) -> float | None:
        """Reference median / this median (above 1: faster than the reference)."""
        ref = self.get(reference_key)
        mine = result.median(setting)
        theirs = ref.median(setting) if ref is not None else None
        return theirs / mine if mine and theirs else None


# --------------------------------------------------------------------------------------------
# Progress on stderr


class Progress:
    """Progress lines on stderr: one line per step, a bar redrawn in place on a terminal."""

    def __init__(self, stream=None, enabled: bool = True) -> None:
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._tty = enabled and hasattr(self._stream, "isatty") and self._stream.isatty()

    def line(self, text: str) -> None:
        if self._enabled:
            print(f"fastonnx bench: {text}", file=self._stream, flush=True)

    def bar(self, label: str, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._tty:
            filled = int(24 * done / max(total, 1))
            end = "\n" if done >= total else ""
            bar = "#" * filled + "." * (24 - filled)
            print(f"\r  {label} [{bar}] {done}/{total}", end=end, file=self._stream, flush=True)
        elif done in {total // 4, total // 2, 3 * total // 4, total}:  # a few lines in logs
            print(f"  {label}: {done}/{total} rounds", file=self._stream, flush=True)


# --------------------------------------------------------------------------------------------
# Inputs


def _check_config(config: BenchConfig) -> None:
    problems = []
    if config.seq_len < 1:
        problems.append(f"sequence length must be >= 1, got {config.seq_len}")
    if not config.threads or min(config.threads) < 1:
        problems.append(f"thread counts must be >= 1, got {list(config.threads)}")
    if config.batch_sizes and min(config.batch_sizes) < 1:
        problems.append(f"batch sizes must be >= 1, got {list(config.batch_sizes)}")
    if config.runs < 1 or config.warmup < 0:
        problems.append(f"need runs >= 1 and warmup >= 0, got {config.runs} and {config.warmup}")
    if config.parity_samples < 1 or config.num_samples < 1:
        problems.append("parity and calibration sample counts must be >= 1")
    unknown = [k for k in config.variants if k not in SPEC_BY_KEY]
    if unknown:
        problems.append(f"unknown variant(s) {unknown}; choose from {list(SPEC_BY_KEY)}")
    if not config.variants:
        problems.append("no variant selected")
    if problems:
        raise BenchError("; ".join(problems))


def load_eval_data(
    path: Path, input_names: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The model inputs and integer ``labels`` of an ``.npz`` file, rows on axis 0."""
    from fastonnx.calibration import read_npz

    arrays = read_npz(path, BenchError)
    missing = [n for n in [*input_names, "labels"] if n not in arrays]
    if missing:
        raise BenchError(f"{path}: no array named {', '.join(missing)} (has {sorted(arrays)})")
    labels = arrays.pop("labels")
    rows = {len(labels), *(len(arrays[n]) for n in input_names)}
    if len(rows) != 1 or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise BenchError(f"{path}: `labels` must be integer class ids [N], one per input row")
    return {n: arrays[n] for n in input_names}, labels


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


# --------------------------------------------------------------------------------------------
# Check: parity and accuracy


def valid_positions(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A token output [B, S, ...] with its padded positions (mask 0) zeroed: what they hold is
    no result (packed fastonnx models give exactly 0 there, padded runtimes anything)."""
    if mask is None or output.ndim < 3 or output.shape[:2] != np.shape(mask):
        return output
    return output * (np.asarray(mask) != 0).reshape(*np.shape(mask), *([1] * (output.ndim - 2)))


def _parity(
    reference: list[np.ndarray],
    outputs: list[np.ndarray],
    name: str,
    masks: Sequence[np.ndarray | None] | None = None,
) -> Parity:
    parity = Parity(output=name, samples=len(reference))
    cosines, worst = [], 0.0
    masks = masks or [None] * len(reference)
    for ref, got, mask in zip(reference, outputs, masks, strict=True):
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        ref, got = valid_positions(ref, mask), valid_positions(got, mask)
        if ref.shape != got.shape:
            parity.error = f"first output has shape {list(got.shape)}, reference {list(ref.shape)}"
            return parity
        if not np.isfinite(got).all():
            parity.error = "first output has NaN or infinite values"
            return parity
        cosines.append(_cosine(ref, got))
        if ref.size:
            worst = max(worst, float(np.abs(ref - got).max()))
    parity.cosine_min, parity.cosine_mean = min(cosines), float(np.mean(cosines))
    parity.max_abs_diff = worst
    return parity


def _accuracy(runner: Runner, inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    correct = 0
    for start in range(0, len(labels), EVAL_BATCH):
        rows = {n: a[start : start + EVAL_BATCH] for n, a in inputs.items()}
        logits = np.asarray(runner.run(runner.bind(rows))[0])
        if logits.ndim != 2:
            raise ValueError(
                f"first output has shape {list(logits.shape)}, not logits [B, classes]"
            )
        correct += int((logits.argmax(axis=1) == labels[start : start + EVAL_BATCH]).sum())
    return correct / len(labels)


def check_variants(
    results: list[VariantResult],
    samples: list[dict[str, np.ndarray]],
    output_name: str,
    threads: int,
    eval_data: tuple[dict[str, np.ndarray], np.ndarray] | None,
    notes: list[str],
    progress: Progress,
) -> None:
    """Open each variant and run the parity samples (and the eval data) through it.

    Parity compares each variant's first output with variant 1's (``output_name``). A variant
    that cannot open or run is marked failed; a missing accuracy figure only adds a note.
    """
    reference = None
    ordered = sorted(results, key=lambda r: r.key != REFERENCE_KEY)  # reference first
    for result in ordered:
        variant = result.variant
        if not variant.ok:
            continue
        progress.line(f"checking {variant.spec.number} {variant.spec.label}")
        try:
            runner = variant.open(threads)
        except Exception as exc:  # noqa: BLE001 - the variant's row says why
            variant.fail("session", exc)
            continue
        try:
            if runner.precision:
                variant.precision = _precision(variant, runner.precision)
            outputs = [runner.run(runner.bind(s))[0] for s in samples]
        except Exception as exc:  # noqa: BLE001
            variant.fail("run", exc)
            runner.close()
            continue
        if result.key == REFERENCE_KEY:
            reference = outputs
        if reference is not None:
            masks = [s.get("attention_mask") for s in samples]
            result.parity = _parity(reference, outputs, output_name, masks)
        if eval_data is not None:
            try:
                result.accuracy = _accuracy(runner, *eval_data)
            except Exception as exc:  # noqa: BLE001 - the figure is optional; say why it is absent
                notes.append(f"no accuracy for {variant.spec.label}: {error_text(exc)}")
        runner.close()
    if reference is None:
        notes.append(f"no parity figures: variant 1 ({REFERENCE_KEY}) did not run")


def _precision(variant: Variant, runtime_precision: str) -> str:
    if variant.spec.key == "openvino-qdq":
        return f"int8 QDQ + {runtime_precision}"
    return runtime_precision


# --------------------------------------------------------------------------------------------
# Timing


def time_rounds(
    calls: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    on_round: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Interleave ``calls`` round by round; (timings, errors) by key.

    Each round is one :func:`time_interleaved` pass (every call once, in order), so progress can
    be shown between rounds, outside any timed region. A call that raises is dropped from the
    following rounds and reported in ``errors``.
    """
    alive = dict(calls)
    errors: dict[str, str] = {}
    samples: dict[str, list[float]] = {k: [] for k in calls}

    def guarded(key: str, fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported per variant
                errors[key] = f"run: {error_text(exc)}"

        return call

    total = warmup + runs
    for i in range(total):
        keys = list(alive)
        round_times = time_interleaved([guarded(k, alive[k]) for k in keys], warmup=0, runs=1)
        for key, t in zip(keys, round_times, strict=True):
            if key in errors:
                alive.pop(key, None)
            elif i >= warmup:
                samples[key].append(t.median_ms)  # one run: the median is the sample
        if on_round:
            on_round(i + 1, total)
    timings = {
        k: Timing(float(np.median(s)), float(np.percentile(s, 90)), len(s))
        for k, s in samples.items()
        if k not in errors and s
    }
    return timings, errors


def time_setting(
    results: list[VariantResult],
    setting: Setting,
    feed: dict[str, np.ndarray],
    config: BenchConfig,
    progress: Progress,
) -> None:
    """Open every variant's session for one setting, then time them interleaved."""
    calls: dict[str, Callable[[], object]] = {}
    runners: list[Runner] = []
    for result in results:
        if not result.variant.ok:
            continue
        try:
            runner = result.variant.open(setting.threads)
            runners.append(runner)
            bound = runner.bind(feed)
        except Exception as exc:  # noqa: BLE001 - this setting only
            result.timings[setting] = Measurement(setting, error=f"session: {error_text(exc)}")
            continue
        calls[result.key] = lambda runner=runner, bound=bound: runner.run(bound)
    label = f"timing {setting.title}: {len(calls)} variants"
    timings, errors = time_rounds(
        calls,
        warmup=config.warmup,
        runs=config.runs,
        on_round=lambda done, total: progress.bar(label, done, total),
    )
    for result in results:
        if result.key in timings:
            result.timings[setting] = Measurement(setting, timings[result.key])
        elif result.key in errors:
            result.timings[setting] = Measurement(setting, error=errors[result.key])
    for runner in runners:
        runner.close()
    gc.collect()  # free this setting's sessions before the next setting opens its own


# --------------------------------------------------------------------------------------------
# Profile


def _profile(result: BenchResult, feed, config: BenchConfig, progress: Progress) -> None:
    from fastonnx.bench.profile import profile_ort

    first = result.settings[0]  # batch 1 on the first thread count
    candidates = [r for r in result.results if r.key in (INT8_REFERENCE_KEY, "fastonnx-qdq")]
    timed = [r for r in candidates if r.median(first) is not None]
    chosen = [r for r in result.results if r.key == "fastonnx"]
    if timed:
        best = min(timed, key=lambda r: r.median(first))
        chosen.append(best)
        result.notes.append(f"profile: ORT's faster int8 variant is {best.variant.spec.label}")
    trace_dir = config.out_dir / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    for r in chosen:
        if not r.variant.ok or r.variant.ort_model is None:
            result.notes.append(f"profile: {r.variant.spec.label} not profiled ({r.variant.error})")
            continue
        progress.line(f"profiling {r.variant.spec.label} ({first.title})")
        path, with_library = r.variant.ort_model
        try:
            result.profiles.append(
                profile_ort(
                    r.key,
                    path,
                    fastonnx=with_library,
                    feed=feed,
                    threads=first.threads,
                    batch=first.batch,
                    warmup=config.warmup,
                    runs=config.runs,
                    spin=config.spin,
                    trace_prefix=trace_dir / r.key,
                )
            )
        except Exception as exc:  # noqa: BLE001
            result.notes.append(f"profile: {r.variant.spec.label} failed ({error_text(exc)})")


# --------------------------------------------------------------------------------------------
# The run


def run_model_bench(config: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """Prepare, check and time every variant; returns the figures (nothing written yet)."""
    from fastonnx import calibration as calib
    from fastonnx.bench.kernels import environment
    from fastonnx.model_io import load_model

    progress = progress or Progress()
    _check_config(config)
    model = load_model(config.model)  # a bad model file ends the run here, with one line
    specs = calib.input_specs(model)
    output_name = model.graph.outputs[0].name
    eval_data = None
    if config.eval_data is not None:
        eval_data = load_eval_data(config.eval_data, [s.name for s in specs])
    config.out_dir.mkdir(parents=True, exist_ok=True)

    env = environment(max(config.threads))
    env["threads"] = list(config.threads)
    env["ort_spinning"] = config.spin
    env["openvino"] = _openvino_version()

    # Identical inputs for every variant: fixed seed, no padding in the timed batch.
    feeds = {
        b: calib.synthesize(
            model, num_samples=1, seq_len=config.seq_len, batch_size=b, seed=config.seed, warn=False
        ).samples[0]
        for b in sorted({s.batch for s in settings_for(config)})
    }
    # Parity samples: a fresh seed, and every other one padded (synthesize does that).
    parity_samples = calib.synthesize(
        model,
        num_samples=config.parity_samples,
        seq_len=config.seq_len,
        seed=config.seed + 1,
        warn=False,
    ).samples

    notes: list[str] = []
    ctx = PrepareContext(
        model_path=config.model,
        out_dir=config.out_dir / "models",
        spin=config.spin,
        calibration=_calibration(model, config),
        fastonnx_model=config.fastonnx_model,
        qdq_model=config.qdq_model,
        padded_model=config.padded_model,
    )
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    def on_prepare(i: int, total: int, variant: Variant, done: bool) -> None:
        spec = variant.spec
        if not done:
            progress.line(f"[{i + 1}/{total}] preparing {spec.number} {spec.label}")
        elif variant.status != "ok":
            progress.line(f"      {variant.status}: {variant.error}")

    keys = [s.key for s in SPECS if s.key in config.variants]  # always in the numbered order
    variants = prepare(ctx, keys, on_prepare)
    results = [VariantResult(v) for v in variants]
    del model, ctx  # free the weights before the sessions load theirs
    gc.collect()

    check_variants(
        results, parity_samples, output_name, max(config.threads), eval_data, notes, progress
    )

    settings = settings_for(config)
    for setting in settings:
        time_setting(results, setting, feeds[setting.batch], config, progress)

    result = BenchResult(config, env, settings, results, notes)
    if config.profile:
        _profile(result, feeds[1], config, progress)
    result.load_average_after = os.getloadavg()
    return result


def _calibration(model, config: BenchConfig):
    """Calibration samples for variants 4 and 5: the given .npz file (a bad one ends the run,
    as any bad input does), or synthesized token inputs of the benchmark's length."""
    from fastonnx import calibration as calib

    if config.calibration is not None:
        return calib.from_npz(config.calibration, model, num_samples=config.num_samples)
    # The optimizer notes a synthetic source in its report; the variants' notes show it.
    return calib.synthesize(
        model, num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed, warn=False
    )


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version().split("-")[0]
