"""Labeled text for ``fastonnx compress``: read a CSV or JSON-lines file, check it, split it.

A row is one example: one or two text columns (a sentence, or a sentence pair) and a label
column holding class ids 0..L-1 (integers, or strings of them). Everything that can be wrong with
the file is found here, before any model is loaded, and raised as :class:`DataError` naming the
file, the column and the first bad row.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastonnx.model_io import InputError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
MIN_ROWS = 16  # fewer cannot give both a training set and a dev set worth measuring
MAX_TEXT_COLUMNS = 2
MAX_FILE_BYTES = 2 << 30  # read into memory: refuse files that cannot be meant for that
MAX_LABELS = 10_000


class DataError(InputError):
    """The data file cannot be used as given (the message says why and where)."""


@dataclass
class LabeledData:
    texts: list[tuple[str, ...]]  # one tuple per row: (text,) or (text_a, text_b)
    labels: list[int]
    num_labels: int
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int]) -> LabeledData:
        return LabeledData(
            [self.texts[i] for i in index],
            [self.labels[i] for i in index],
            self.num_labels,
            self.source,
        )


def _rows(path: Path, kind: str) -> tuple[list[dict[str, object]], list[str]]:
    """The file's rows as dicts, and the column names it has."""
    text = path.read_bytes().decode("utf-8-sig", errors="strict")
    if kind in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if kind == "csv" else "\t")
        columns = list(reader.fieldnames or [])
        return [dict(row) for row in reader], columns
    rows, columns = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        for key in row:
            if key not in columns:
                columns.append(key)
        rows.append(row)
    return rows, columns


def _class_id(value: object) -> int | None:
    """``value`` as a class id, or None when it is not one (floats, words, negatives...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def load_labeled(
    path: str | os.PathLike,
    text_columns: Sequence[str] = ("text",),
    label_column: str = "label",
    num_labels: int | None = None,
) -> LabeledData:
    """Rows of a ``.csv``/``.tsv`` (with a header) or ``.jsonl`` file, checked.

    ``num_labels``: the classes a model's head has (labels must be below it); None takes
    max(label) + 1 and requires at least two classes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; use .csv, .tsv (with a header row) "
            "or .jsonl (one JSON object a line)"
        )
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the data file is empty")
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes is more than the {MAX_FILE_BYTES} this reads")
    text_columns = list(text_columns)
    if not 1 <= len(text_columns) <= MAX_TEXT_COLUMNS:
        raise DataError(f"give one or two text columns (a sentence or a pair), got {text_columns}")
    try:
        rows, columns = _rows(path, kind)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not readable as {kind.upper()} ({exc})") from None
    missing = [c for c in [*text_columns, label_column] if c not in columns]
    if missing:
        have = ", ".join(repr(c) for c in columns) or "none"
        raise DataError(
            f"{path}: no column {', '.join(repr(c) for c in missing)}; the file's columns: "
            f"{have} (choose them with --text-column / --label-column)"
        )
    texts, labels = [], []
    for number, row in enumerate(rows, 2 if kind != "jsonl" else 1):
        label = _class_id(row.get(label_column))
        if label is None:
            raise DataError(
                f"{path}: row {number}: label {row.get(label_column)!r} in column "
                f"{label_column!r} is not a class id (an integer 0..L-1); map class names to "
                "ids first"
            )
        parts = []
        for column in text_columns:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}: row {number}: column {column!r} holds no text")
            parts.append(value.strip())
        texts.append(tuple(parts))
        labels.append(label)
    if len(rows) < MIN_ROWS:
        raise DataError(
            f"{path}: {len(rows)} rows; compressing needs at least {MIN_ROWS} (a training set "
            "and a dev set)"
        )
    top = max(labels)
    if num_labels is None:
        if top + 1 > MAX_LABELS:
            raise DataError(f"{path}: label {top} is above the {MAX_LABELS} classes accepted")
        num_labels = top + 1
        if num_labels < 2:
            raise DataError(f"{path}: every label is {top}; a classifier needs two classes")
    elif top >= num_labels:
        raise DataError(
            f"{path}: label {top} in column {label_column!r}, but the model's head has "
            f"{num_labels} classes (ids 0..{num_labels - 1})"
        )
    return LabeledData(texts, labels, num_labels, str(path))


def split(data: LabeledData, dev_fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
    """A seeded shuffle; the last ``dev_fraction`` (at least 2 rows) is the dev set."""
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"the dev fraction must be in (0, 1), got {dev_fraction}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    dev = max(2, round(dev_fraction * len(order)))
    if len(order) - dev < 2:
        raise DataError(f"{data.source}: too few rows to keep {dev} for the dev set")
    return data.subset(order[:-dev]), data.subset(order[-dev:])


def load_sentences(path: str | os.PathLike, text_column: str = "text") -> LabeledData:
    """Unlabeled sentences (embedding mode): a ``.txt`` file (one a line) or the text column of
    a ``.csv``/``.tsv``/``.jsonl`` file. Labels are all -1 (none)."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use .txt, .csv, .jsonl")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the data file is empty")
        rows, columns = _rows(path, kind)
        if text_column not in columns:
            have = ", ".join(repr(c) for c in columns) or "none"
            raise DataError(f"{path}: no column {text_column!r}; the file's columns: {have}")
        lines = [row.get(text_column) for row in rows]
    else:
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path}: more than the {MAX_FILE_BYTES} bytes this reads")
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    texts = [(t.strip(),) for t in lines if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{path}: no sentences in the data file")
    if len(texts) < MIN_ROWS:
        raise DataError(f"{path}: {len(texts)} sentences; compressing needs at least {MIN_ROWS}")
    return LabeledData(texts, [-1] * len(texts), 0, str(path))
