"""Sample inputs for calibration and verification.

Three sources, best first:

* :func:`from_npz` — arrays saved with ``numpy.savez``, one per model input name, axis 0 the batch;
* :func:`from_text` — one sentence per line, tokenized with a local Hugging Face tokenizer folder;
* :func:`synthesize` — valid random token inputs built from the model's own input names and shapes
  (prints a warning: activation ranges from random tokens are a rough guess of real ones).

A sample is a ``dict[str, np.ndarray]`` feed for ``InferenceSession.run``.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from fastonnx.model_io import InputError

Sample = dict[str, np.ndarray]

DEFAULT_NUM_SAMPLES = 16
DEFAULT_SEQ_LEN = 64
_FALLBACK_VOCAB = 100  # every BERT-class vocabulary is larger; used when it cannot be read


class CalibrationError(InputError):
    """Calibration data that does not fit the model (missing inputs, wrong shapes, bad files)."""


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, NumPy dtype and shape (ints, or None / a name when dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


@dataclass
class CalibrationData:
    samples: list[Sample]
    source: str  # for reports: "file.npz", "text file.txt (tokenizer dir)", "synthetic"
    synthetic: bool = False

    def __len__(self) -> int:
        return len(self.samples)


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():  # old exports list initializers as inputs too
            continue
        if value.dtype is None:
            raise CalibrationError(f"model input '{value.name}' has no element type")
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value or None) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    return specs


def _check_and_cast(sample: Sample, specs: Sequence[InputSpec], where: str) -> Sample:
    """Cast each array to its input's dtype; check ranks and static dimensions."""
    out = {}
    for spec in specs:
        array = np.asarray(sample[spec.name])
        if array.size == 0:
            axis = array.shape.index(0) if array.ndim else 0
            raise CalibrationError(
                f"{where}: input '{spec.name}' has shape {list(array.shape)}, empty along axis "
                f"{axis}; calibration and verification need non-empty inputs"
            )
        if array.dtype.kind not in "biuf":
            raise CalibrationError(
                f"{where}: input '{spec.name}' is {array.dtype}; numeric arrays are needed"
            )
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has shape {list(array.shape)}, "
                    f"the model expects rank {len(spec.shape)} {list(spec.shape)}"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
                if isinstance(want, int) and got != want:
                    raise CalibrationError(
                        f"{where}: input '{spec.name}' has size {got} on axis {axis}, "
                        f"the model expects {want} (shape {list(spec.shape)})"
                    )
        if array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise CalibrationError(
                    f"{where}: input '{spec.name}' is {array.dtype}, the model expects {spec.dtype}"
                )
            array = array.astype(spec.dtype)
        out[spec.name] = array
    return out


def _batch_size(spec: InputSpec, default: int) -> int:
    if spec.shape and isinstance(spec.shape[0], int):
        return spec.shape[0]
    return default


# --------------------------------------------------------------------------------------------
# .npz files


def read_npz(path: Path, error: type[Exception]) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file; a missing or unreadable file raises ``error``."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a file")
    # np.load takes any format it knows (.npy, pickles) whatever the name says; check first, so
    # a wrong file gets a message about what it is rather than numpy's.
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise error(
            f"{path}: a .npy file (one array), not an .npz archive of named arrays; "
            "write one with numpy.savez(path, input_ids=..., attention_mask=...)"
        )
    if not zipfile.is_zipfile(path):
        raise error(f"{path}: not an .npz file (an .npz is a zip archive written by numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise error(f"{path}: holds an object array; only numeric arrays are read") from exc
        raise error(f"{path}: not a readable .npz file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - zipfile / numpy raise several types
        raise error(f"{path}: not a readable .npz file ({exc})") from exc
    # numpy hands a zip member without the .npy suffix back as raw bytes, not an array.
    raw = sorted(name for name, value in arrays.items() if not isinstance(value, np.ndarray))
    if raw:
        raise error(
            f"{path}: member {raw[0]!r} is not a .npy array (numpy.savez writes only those)"
        )
    return arrays


def from_npz(
    path: str | os.PathLike,
    model: ir.Model,
    *,
    num_samples: int | None = None,
    batch_size: int = 1,
) -> CalibrationData:
    """Samples from an ``.npz`` file holding one array per model input, axis 0 the batch.

    Rows are grouped ``batch_size`` at a time (or by the model's static batch size).
    """
    path = Path(path)
    specs = input_specs(model)
    arrays = read_npz(path, CalibrationError)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationError(
            f"{path}: no array for model input(s) {', '.join(missing)} "
            f"(file has {', '.join(sorted(arrays)) or 'nothing'})"
        )
    rows = {arrays[s.name].shape[0] if arrays[s.name].ndim else 0 for s in specs}
    if len(rows) != 1 or 0 in rows:
        raise CalibrationError(
            f"{path}: arrays must share their first (batch) axis; got "
            + ", ".join(f"{s.name} {list(arrays[s.name].shape)}" for s in specs)
        )
    total = rows.pop()
    step = _batch_size(specs[0], batch_size)
    samples = []
    for start in range(0, total - step + 1, step):
        raw = {s.name: arrays[s.name][start : start + step] for s in specs}
        samples.append(_check_and_cast(raw, specs, str(path)))
        if num_samples is not None and len(samples) >= num_samples:
            break
    if not samples:
        raise CalibrationError(f"{path}: {total} rows, fewer than one batch of {step}")
    return CalibrationData(samples, source=str(path))


# --------------------------------------------------------------------------------------------
# Text + tokenizer


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file; CalibrationError if there are none."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except FileNotFoundError as exc:
        raise CalibrationError(f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not a UTF-8 text file") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise CalibrationError(f"{path}: no non-empty lines")
    return lines


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A Hugging Face tokenizer from a local folder (never the hub)."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise CalibrationError(f"tokenizer folder {tokenizer_dir} does not exist")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise CalibrationError(
            "a tokenizer needs the transformers package (pip install transformers)"
        ) from exc
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/...
        raise CalibrationError(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc


def from_text(
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    model: ir.Model,
    *,
    num_samples: int | None = None,
    batch_size: int = 1,
    max_length: int = 128,
) -> CalibrationData:
    """Samples from a text file (one sentence per line) and a local tokenizer folder (offline)."""
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    lines = read_lines(path)
    tokenizer = load_tokenizer(tokenizer_dir)

    specs = input_specs(model)
    step = _batch_size(specs[0], batch_size)
    static_len = next(
        (s.shape[1] for s in specs if s.shape and len(s.shape) > 1 and isinstance(s.shape[1], int)),
        None,
    )
    samples = []
    for start in range(0, len(lines) - step + 1, step):
        encoded = tokenizer(
            lines[start : start + step],
            padding="max_length" if static_len else "longest",
            truncation=True,
            max_length=static_len or max_length,
            return_tensors="np",
        )
        raw = {}
        for spec in specs:
            if spec.name in encoded:
                raw[spec.name] = encoded[spec.name]
            elif spec.name in ("token_type_ids", "position_ids"):
                ids = encoded["input_ids"]
                fill = np.arange(ids.shape[1])[None, :] if spec.name == "position_ids" else 0
                raw[spec.name] = np.broadcast_to(fill, ids.shape).astype(spec.dtype)
            else:
                raise CalibrationError(
                    f"the tokenizer in {tokenizer_dir} does not produce model input "
                    f"'{spec.name}' (it gives {', '.join(encoded.keys())})"
                )
        samples.append(_check_and_cast(raw, specs, str(path)))
        if num_samples is not None and len(samples) >= num_samples:
            break
    return CalibrationData(samples, source=f"{path} (tokenizer {tokenizer_dir})")


# --------------------------------------------------------------------------------------------
# Synthetic token inputs


def vocab_size(model: ir.Model, input_name: str = "input_ids") -> int | None:
    """Rows of the embedding table that ``input_name`` indexes, if the graph shows it.

    Follows the ids through shape-only / cast ops to the Gather whose data is a 2-D constant.
    """
    passthrough = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
    value = next((v for v in model.graph.inputs if v.name == input_name), None)
    frontier = [value] if value is not None else []
    seen = set()
    while frontier:
        current = frontier.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for node, index in current.uses():
            if node.op_type == "Gather" and index == 1 and node.domain == "":
                table = node.inputs[0].const_value if node.inputs[0] is not None else None
                if table is not None and len(table.shape) == 2:
                    return int(table.shape[0])
                if table is not None and len(table.shape) == 1:  # an id remap (trim_vocab)
                    return int(table.shape[0])
            elif node.op_type in passthrough and index == 0:
                frontier.extend(node.outputs)
    return None


def synthesize(
    model: ir.Model,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    seed: int = 0,
    warn: bool = True,
) -> CalibrationData:
    """Random but valid encoder inputs built from the model's input names and shapes.

    ``input_ids`` are drawn below the embedding table's row count; every other sample pads its
    last quarter (``attention_mask`` 0, ids 0); ``token_type_ids`` are zeros, ``position_ids`` a
    range; other integer inputs are zeros and float inputs standard normal.
    """
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be >= 1, got {num_samples}")
    specs = input_specs(model)
    vocab = vocab_size(model) or _FALLBACK_VOCAB
    low = min(5, vocab - 1)  # skip the first ids, special tokens in BERT-class vocabularies
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        padded = i % 2 == 1
        sample = {}
        for spec in specs:
            dims = spec.shape if spec.shape is not None else ("batch", "sequence")
            shape = [
                d if isinstance(d, int) else (batch_size if axis == 0 else seq_len)
                for axis, d in enumerate(dims)
            ]
            sample[spec.name] = _synthetic_array(spec, shape, rng, vocab, low, padded)
        if padded and "attention_mask" in sample and "input_ids" in sample:
            ids = sample["input_ids"]
            sample["input_ids"] = np.where(sample["attention_mask"] == 0, 0, ids).astype(ids.dtype)
        samples.append(_check_and_cast(sample, specs, "synthetic inputs"))
    if warn:
        print(
            "fastonnx: warning: calibrating on synthesized random tokens; accuracy will be "
            "better with real data (--calibration FILE.npz or --calibration-text FILE "
            "--tokenizer DIR)",
            file=sys.stderr,
        )
    return CalibrationData(samples, source="synthetic", synthetic=True)


def _synthetic_array(spec, shape, rng, vocab, low, padded) -> np.ndarray:
    name = spec.name.lower()
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if np.issubdtype(spec.dtype, np.bool_):
        return np.ones(shape, dtype=spec.dtype)
    if "input_ids" in name:
        return rng.integers(low, vocab, size=shape).astype(spec.dtype)
    if "mask" in name:
        mask = np.ones(shape, dtype=spec.dtype)
        if padded and len(shape) >= 2 and shape[-1] >= 4:
            mask[..., shape[-1] - shape[-1] // 4 :] = 0
        return mask
    if "position" in name and len(shape) >= 1:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
    return np.zeros(shape, dtype=spec.dtype)  # token_type_ids and unknown integer inputs


# --------------------------------------------------------------------------------------------
# One entry point for the optimize command


def load_calibration(
    model: ir.Model,
    *,
    npz: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    warn: bool = True,
) -> CalibrationData:
    """Pick the source from the options given: an .npz file, text + tokenizer, or synthesized."""
    if num_samples is not None and num_samples < 1:
        raise CalibrationError(f"the number of samples must be >= 1, got {num_samples}")
    if npz is not None and text is not None:
        raise CalibrationError("give either an .npz file or a text file for calibration, not both")
    if npz is not None:
        return from_npz(npz, model, num_samples=num_samples)
    if text is not None:
        if tokenizer is None:
            raise CalibrationError("a calibration text file needs a tokenizer folder (--tokenizer)")
        return from_text(text, tokenizer, model, num_samples=num_samples)
    if tokenizer is not None:
        raise CalibrationError("--tokenizer is only used with a calibration text file")
    return synthesize(model, num_samples=num_samples or DEFAULT_NUM_SAMPLES, seed=seed, warn=warn)
