"""`fastonnx bench MODEL.onnx --texts FILE --tokenizer DIR`: timing on real sentences.

Real traffic is sentences of mixed length; batched, each batch is padded to its longest. This
benchmark draws ``batches`` random batches of B sentences from the file (seeded), tokenizes each
batch padded to its own longest sentence (at most ``seq_len`` tokens), and times every variant
on the same batches: packed fastonnx (only the valid tokens computed), padded fastonnx
(``--no-packing``), ORT dynamic int8 and OpenVINO on the int8 QDQ model (every padded slot
computed). One round runs every batch once; the variants run interleaved round by round after a
warm-up round, on the most ``threads``; median and p90 of the round times.

Figures: sequences/s and tokens/s (valid tokens, padding not counted) at the median, the
fraction of token slots that are real tokens, and each variant's first output against padded
fastonnx's at the valid positions (cosine), with whether packed padded positions are exactly 0.

Dimensions: B batch, S a batch's longest sentence.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastonnx.bench.model import BenchConfig, BenchError, Progress, valid_positions
from fastonnx.bench.timing import Timing
from fastonnx.bench.variants import SPEC_BY_KEY, PrepareContext, error_text, prepare

TEXT_VARIANTS = ("fastonnx", "fastonnx-padded", "ort-int8", "openvino-qdq")
PARITY_REFERENCE = "fastonnx-padded"


@dataclass
class Batches:
    feeds: list[dict[str, np.ndarray]]
    sequences: int
    tokens: int  # valid tokens over all batches
    slots: int  # B x S over all batches

    @property
    def fill(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0


@dataclass
class TextRow:
    key: str
    number: str
    label: str
    status: str = "ok"
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    timing: Timing | None = None
    sequences_per_s: float | None = None
    tokens_per_s: float | None = None
    cosine_min: float | None = None  # vs padded fastonnx at valid positions
    padded_positions_zero: bool | None = None


@dataclass
class TextBenchResult:
    model: str
    texts: str
    environment: dict
    batch: int
    threads: int
    batches: int
    sequences: int
    tokens: int
    fill: float
    rows: list[TextRow]
    notes: list[str] = field(default_factory=list)


def read_texts(path: Path) -> list[str]:
    """Sentences: one per line, or the last column of a .csv file (e.g. Pang & Lee's)."""
    from fastonnx.calibration import CalibrationError, read_lines

    if path.suffix.lower() == ".csv":
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                texts = [row[-1].strip() for row in csv.reader(f) if row and row[-1].strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise BenchError(f"{path}: cannot read ({exc})") from exc
    else:
        try:
            texts = read_lines(path)
        except CalibrationError as exc:
            raise BenchError(str(exc)) from exc
    if not texts:
        raise BenchError(f"{path}: no sentences")
    return texts


def make_batches(
    texts: Sequence[str],
    tokenizer,
    *,
    batch: int,
    count: int,
    max_len: int,
    seed: int,
    input_names: Sequence[str],
) -> Batches:
    """``count`` batches of ``batch`` random sentences, each padded to its longest."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    feeds, tokens, slots = [], 0, 0
    for i in range(count):
        idx = [order[(i * batch + j) % len(texts)] for j in range(batch)]
        enc = tokenizer(
            [texts[j] for j in idx],
            padding="longest",
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        feed = {k: np.asarray(v, np.int64) for k, v in enc.items() if k in input_names}
        if "token_type_ids" in input_names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        mask = feed["attention_mask"]
        tokens += int(mask.sum())
        slots += int(mask.size)
        feeds.append(feed)
    return Batches(feeds, batch * count, tokens, slots)


def _input_names(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def run_text_bench(
    config: BenchConfig,
    texts_path: Path,
    tokenizer_dir: Path,
    progress: Progress,
    *,
    batches: int = 8,
) -> TextBenchResult:
    from fastonnx import calibration as calib
    from fastonnx.bench.kernels import environment
    from fastonnx.model_io import load_model

    if "attention_mask" not in (names := _input_names(config.model)):
        raise BenchError(f"{config.model}: no attention_mask input; --texts needs one")
    texts = read_texts(texts_path)
    try:
        tokenizer = calib.load_tokenizer(tokenizer_dir)
    except calib.CalibrationError as exc:
        raise BenchError(str(exc)) from exc
    batch, threads = max(config.batch_sizes or (32,)), max(config.threads)
    data = make_batches(
        texts,
        tokenizer,
        batch=batch,
        count=batches,
        max_len=config.seq_len,
        seed=config.seed,
        input_names=names,
    )

    progress.line(f"calibrating on {config.num_samples} sentences of {texts_path.name}")
    model = load_model(config.model)
    if config.calibration is not None:
        cal = calib.from_npz(config.calibration, model, num_samples=config.num_samples)
    else:
        cal = _text_calibration(model, texts, tokenizer_dir, config)
    del model
    ctx = PrepareContext(
        model_path=config.model,
        out_dir=config.out_dir / "models",
        spin=config.spin,
        calibration=cal,
        fastonnx_model=config.fastonnx_model,
        qdq_model=config.qdq_model,
        padded_model=config.padded_model,
    )
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k in SPEC_BY_KEY if k in config.variants]
    variants = prepare(ctx, keys, progress=None)
    rows = [
        TextRow(v.spec.key, v.spec.number, v.spec.label, v.status, v.error, list(v.notes))
        for v in variants
    ]
    by_key = dict(zip(keys, rows, strict=True))

    runners = {}
    for variant, row in zip(variants, rows, strict=True):
        if not variant.ok:
            continue
        progress.line(f"opening {variant.spec.number} {variant.spec.label}")
        try:
            runner = variant.open(threads)
            bound = [runner.bind(f) for f in data.feeds]
            outputs = [runner.run(b)[0] for b in bound[:2]]
        except Exception as exc:  # noqa: BLE001 - the row says why
            row.status, row.error = "failed", error_text(exc)
            continue
        runners[variant.spec.key] = (runner, bound, outputs)
    _parity(runners, by_key, data)

    progress.line(f"timing {len(runners)} variants, {config.runs} rounds of {batches} batches")
    samples = _time(runners, warmup=1 if config.warmup else 0, runs=config.runs)
    for key, times in samples.items():
        med = float(np.median(times))
        row = by_key[key]
        row.timing = Timing(med * 1e3, float(np.percentile(times, 90)) * 1e3, len(times))
        row.sequences_per_s = data.sequences / med
        row.tokens_per_s = data.tokens / med
    for runner, _, _ in runners.values():
        runner.close()
    gc.collect()
    result = TextBenchResult(
        model=str(config.model),
        texts=str(texts_path),
        environment=environment(threads),
        batch=batch,
        threads=threads,
        batches=batches,
        sequences=data.sequences,
        tokens=data.tokens,
        fill=data.fill,
        rows=rows,
    )
    result.notes.append(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return result


def _text_calibration(model, texts: Sequence[str], tokenizer_dir: Path, config: BenchConfig):
    """Calibration feeds from the benchmark's own sentences (the first ``num_samples``)."""
    import tempfile

    from fastonnx import calibration as calib

    with tempfile.TemporaryDirectory(prefix="fastonnx-bench-") as tmp:
        path = Path(tmp) / "calibration.txt"
        path.write_text("\n".join(texts[: config.num_samples]), encoding="utf-8")
        return calib.from_text(path, tokenizer_dir, model, num_samples=config.num_samples)


def _parity(runners: dict, rows: dict[str, TextRow], data: Batches) -> None:
    if PARITY_REFERENCE not in runners:
        return
    reference = runners[PARITY_REFERENCE][2]
    masks = [f["attention_mask"] for f in data.feeds[: len(reference)]]
    for key, (_, _, outputs) in runners.items():
        row, cosines, zero = rows[key], [], True
        for ref, got, mask in zip(reference, outputs, masks, strict=True):
            ref = valid_positions(np.asarray(ref, np.float64), mask)
            got64 = np.asarray(got, np.float64)
            if got64.shape != ref.shape:
                row.notes.append(f"first output shape {list(got64.shape)} != {list(ref.shape)}")
                cosines = []
                break
            if got64.ndim >= 3:
                zero = zero and not np.any(got64[np.asarray(mask) == 0])
            got64 = valid_positions(got64, mask)
            na, nb = np.linalg.norm(ref), np.linalg.norm(got64)
            cosines.append(float(ref.ravel() @ got64.ravel() / (na * nb)) if na * nb else 1.0)
        row.cosine_min = min(cosines) if cosines else None
        row.padded_positions_zero = zero


def _time(runners: dict, *, warmup: int, runs: int) -> dict[str, list[float]]:
    """Seconds per round (every batch once) per variant, interleaved round by round."""

    def one_round(runner, bound) -> float:
        start = time.perf_counter()
        for b in bound:
            runner.run(b)
        return time.perf_counter() - start

    for _ in range(warmup):
        for runner, bound, _ in runners.values():
            one_round(runner, bound)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for key, (runner, bound, _) in runners.items():
            samples[key].append(one_round(runner, bound))
    return samples


def format_text_result(result: TextBenchResult) -> str:
    env = result.environment
    lines = [
        f"# {env.get('cpu', '?')}; {result.threads} thread(s); load average "
        f"{' '.join(f'{v:.2f}' for v in env.get('load_average', []))} (shared machine: noisy)",
        f"# {result.texts}: {result.batches} random batches of {result.batch} sentences, each "
        f"padded to its longest: {result.sequences} sequences, {result.tokens} tokens, "
        f"{result.fill:.0%} of the token slots real",
    ]
    ok = {r.key: r for r in result.rows if r.sequences_per_s}
    padded = ok.get(PARITY_REFERENCE)
    ov = ok.get("openvino-qdq")
    header = (
        f"{'':3} {'variant':<30} {'round ms':>9} {'p90':>8} {'seq/s':>8} {'tokens/s':>9} "
        f"{'vs padded':>9} {'vs OV int8':>10} {'cos valid':>9}"
    )
    lines.append(header)
    for r in result.rows:
        if r.status != "ok" or r.timing is None:
            lines.append(f"{r.number:<3} {r.label:<30} {r.status}: {r.error}")
            continue
        vs_pad = f"{r.sequences_per_s / padded.sequences_per_s:.2f}x" if padded else "-"
        vs_ov = f"{r.sequences_per_s / ov.sequences_per_s:.2f}x" if ov else "-"
        cos = f"{r.cosine_min:.6f}" if r.cosine_min is not None else "-"
        lines.append(
            f"{r.number:<3} {r.label:<30} {r.timing.median_ms:>9.1f} {r.timing.p90_ms:>8.1f} "
            f"{r.sequences_per_s:>8.1f} {r.tokens_per_s:>9.0f} {vs_pad:>9} {vs_ov:>10} {cos:>9}"
        )
    packed = next((r for r in result.rows if r.key == "fastonnx"), None)
    if packed is not None and packed.padded_positions_zero is not None:
        lines.append(
            "packed fastonnx: padded positions exactly 0: "
            + ("yes" if packed.padded_positions_zero else "NO")
        )
    for r in result.rows:
        lines.extend(f"  {r.number} {r.label}: {n}" for n in r.notes)
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)


def write_text_json(result: TextBenchResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2, default=str), encoding="utf-8")
    return path


__all__ = [
    "TEXT_VARIANTS",
    "Batches",
    "TextBenchResult",
    "format_text_result",
    "make_batches",
    "read_texts",
    "run_text_bench",
    "write_text_json",
]
