"""``fastonnx compress``: a Hugging Face model folder + labeled text -> a block-sparse student,
its ONNX files (fp32 and fastonnx sparse INT8) and a report.

Steps (``OUT`` is the output folder):

1. check everything that can be wrong before training (:func:`prepare`): the sparsity, the
   block shape (supported, dividing every pruned layer), the model folder (config, weights,
   tokenizer), the data file (columns, class-id labels, enough rows);
2. the teacher: the model itself when it has a sequence-classification head, else the encoder
   fine-tuned with a fresh head first (``OUT/teacher``);
3. prune + distill a copy of the teacher (cubic schedule to ``sparsity``, then recovery), with a
   checkpoint every ``checkpoint_every`` steps in ``OUT/checkpoint`` (``resume`` continues
   from it, bit for bit);
4. ``OUT/student`` (weights + tokenizer), ``OUT/onnx/student.onnx`` (checked to carry the block
   sparsity), ``OUT/onnx/student.fast.onnx`` (``fastonnx.optimize``, sparse-int8), and
   ``OUT/report.json`` / ``OUT/report.md``: dev accuracy of the teacher, of the student in fp32
   (PyTorch and ONNX Runtime) and through fastonnx; per-layer sparsity.

Every output is written to a temporary name and renamed into place; the report comes last, so
a folder with a report is complete.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastonnx.compress import checkpoint
from fastonnx.compress._deps import require_torch, require_transformers
from fastonnx.compress.data import DataError, LabeledData, load_labeled, load_sentences, split
from fastonnx.compress.embedding import pooling_of
from fastonnx.compress.pruning import (
    DEFAULT_EXCLUDE,
    check_block_shape_divides,
    check_target,
    resolve_block_shape,
    select_linear_layers,
    target_isa,
)
from fastonnx.compress.schedule import check_sparsity
from fastonnx.model_io import InputError

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class CompressError(InputError):
    """Bad input to ``fastonnx compress`` (found before training)."""


@dataclass
class CompressConfig:
    model: Path  # a local Hugging Face model folder
    data: Path  # .csv / .tsv / .jsonl
    output: Path
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    sparsity: float = 0.8
    block_shape: str | None = None  # "RxC"; None: the target's preferred shape
    target: str = "auto"
    steps: int | None = None  # None: `epochs` passes over the training split
    epochs: float = 2.0
    teacher_epochs: float = 2.0  # fine-tuning a head first (a model without one)
    batch_size: int = 32
    max_len: int = 128
    lr: float = 2e-4
    teacher_lr: float = 5e-5
    prune_end_fraction: float = 0.4
    temperature: float = 2.0
    alpha_task: float = 0.5
    alpha_kd: float = 0.5
    alpha_hidden: float = 0.1
    scope: str = "layer"
    criterion: str = "fisher"  # block ranking: "fisher" (w^2 * E[g^2]) or "magnitude"
    dev_fraction: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps this run
    resume: bool = False
    force: bool = False
    exporter: str = "dynamo"  # or "legacy"
    calibration_samples: int = 64
    threads: int | None = None  # torch threads; None leaves torch's default
    # "labeled": a classifier on labeled rows; "embedding": an encoder's pooled sentence vector
    # distilled on unlabeled sentences (sentence-transformers models).
    mode: str = "labeled"
    alpha_cosine: float = 1.0  # embedding mode: weight of 1 - cosine(student, teacher)
    # Student batches of rows of one token length: about half the padding, a cheaper step.
    group_by_length: bool = True
    # > 0: LengthDrop training (fastonnx.compress.length_drop) with this most a layer drops, so
    # the student also runs well at reduced length configurations (labeled mode).
    length_drop: float = 0.0

    # Options that change what training computes: a checkpoint resumes only with the same.
    _TRAINING_FIELDS = (
        "text_columns",
        "label_column",
        "sparsity",
        "block_shape",
        "target",
        "steps",
        "epochs",
        "teacher_epochs",
        "batch_size",
        "max_len",
        "lr",
        "teacher_lr",
        "prune_end_fraction",
        "temperature",
        "alpha_task",
        "alpha_kd",
        "alpha_hidden",
        "scope",
        "criterion",
        "dev_fraction",
        "seed",
        "mode",
        "alpha_cosine",
        "group_by_length",
        "length_drop",
    )


@dataclass
class Plan:
    """What :func:`prepare` checked and loaded."""

    config: CompressConfig
    block_shape: tuple[int, int]
    train: LabeledData
    dev: LabeledData
    tokenizer: Any
    model: Any  # the teacher, or the encoder + fresh head to fine-tune into one
    has_head: bool
    steps: int
    teacher_steps: int
    fingerprint: str
    pooling: str = "mean"  # embedding mode
    notes: list[str] = field(default_factory=list)

    @property
    def embedding(self) -> bool:
        return self.config.mode == "embedding"


# --------------------------------------------------------------------------------------------
# Checks before any training


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CompressError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: no config.json; give a Hugging Face model folder")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CompressError(
            f"{folder}: no model weights ({', '.join(WEIGHT_FILES[:2])}); save the model with "
            "save_pretrained()"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CompressError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); save the "
            "tokenizer into the model folder with tokenizer.save_pretrained()"
        )


def _has_classification_head(model_config: Any) -> bool:
    architectures = getattr(model_config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _fingerprint(config: CompressConfig, data_file: Path, model_folder: Path) -> str:
    digest = hashlib.sha256()
    settings = {name: getattr(config, name) for name in CompressConfig._TRAINING_FIELDS}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(data_file.read_bytes())
    for name in ("config.json", *WEIGHT_FILES):
        path = model_folder / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _steps_for(rows: int, batch_size: int, epochs: float) -> int:
    return max(1, round(epochs * -(-rows // batch_size)))


def prepare(config: CompressConfig, log: Callable[[str], None] | None = None) -> Plan:
    """Check the inputs and load the model, tokenizer and data; :class:`CompressError` (or
    :class:`~fastonnx.compress.data.DataError`) names the first problem."""
    log = log or _stderr
    try:
        check_sparsity(config.sparsity, "--sparsity")
        target = check_target(config.target)
        block = resolve_block_shape(config.block_shape, target)
    except ValueError as exc:
        raise CompressError(str(exc)) from None
    for name in ("batch_size", "max_len", "checkpoint_every", "calibration_samples"):
        if getattr(config, name) < 1:
            raise CompressError(f"--{name.replace('_', '-')} must be >= 1")
    if config.steps is not None and config.steps < 1:
        raise CompressError(f"--steps must be >= 1, got {config.steps}")
    if config.stop_after is not None and config.stop_after < 1:
        raise CompressError(f"--stop-after must be >= 1, got {config.stop_after}")
    if config.epochs <= 0 or config.teacher_epochs <= 0:
        raise CompressError("--epochs and --teacher-epochs must be > 0")
    if not 0.0 <= config.prune_end_fraction <= 1.0:
        raise CompressError("--prune-end must be in [0, 1]")
    if config.exporter not in ("dynamo", "legacy"):
        raise CompressError(f"unknown exporter {config.exporter!r}; choose dynamo or legacy")
    if config.mode not in ("labeled", "embedding"):
        raise CompressError(f"unknown mode {config.mode!r}; choose labeled or embedding")
    if config.scope not in ("layer", "global"):
        raise CompressError(f"unknown scope {config.scope!r}; choose layer or global")
    if config.criterion not in ("magnitude", "fisher"):
        raise CompressError(f"unknown criterion {config.criterion!r}; choose magnitude or fisher")
    if not 0.0 < config.dev_fraction < 1.0:
        raise CompressError(f"--dev-fraction must be in (0, 1), got {config.dev_fraction}")
    if not 0.0 <= config.length_drop < 1.0:
        raise CompressError(f"--length-drop must be in [0, 1), got {config.length_drop}")
    if config.length_drop and config.mode == "embedding":
        raise CompressError("--length-drop trains classifiers; embedding mode does not take it")
    model_folder = Path(config.model)
    _check_model_folder(model_folder)

    require_torch("fastonnx compress")
    transformers = require_transformers("fastonnx compress")
    try:
        model_config = transformers.AutoConfig.from_pretrained(model_folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types on bad folders
        raise CompressError(f"{model_folder}: config.json is not readable ({exc})") from None
    embedding = config.mode == "embedding"
    has_head = _has_classification_head(model_config) and not embedding
    if embedding:
        data = load_sentences(config.data, config.text_columns[0])
    else:
        # A head fixes the classes; a bare encoder gets as many as the labels need.
        data = load_labeled(
            config.data,
            config.text_columns,
            config.label_column,
            num_labels=model_config.num_labels if has_head else None,
        )
    train_data, dev_data = split(data, config.dev_fraction, config.seed)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"{model_folder}: the tokenizer does not load ({exc})") from None
    try:
        if embedding:
            model = transformers.AutoModel.from_pretrained(model_folder)
        else:
            kwargs = {} if has_head else {"num_labels": data.num_labels}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_folder, **kwargs
            )
    except Exception as exc:  # noqa: BLE001
        raise CompressError(f"{model_folder}: the weights do not load ({exc})") from None
    try:
        check_block_shape_divides(select_linear_layers(model, None, DEFAULT_EXCLUDE), block)
    except ValueError as exc:
        raise CompressError(str(exc)) from None
    steps = config.steps or _steps_for(len(train_data), config.batch_size, config.epochs)
    plan = Plan(
        config=config,
        block_shape=block,
        train=train_data,
        dev=dev_data,
        tokenizer=tokenizer,
        model=model.eval(),
        has_head=has_head,
        steps=steps,
        teacher_steps=_steps_for(len(train_data), config.batch_size, config.teacher_epochs),
        fingerprint=_fingerprint(config, Path(config.data), model_folder),
        pooling=pooling_of(model_folder),
    )
    r, c = block
    what = f"{plan.pooling}-pooled embeddings" if embedding else f"{data.num_labels} classes"
    log(
        f"[compress] {len(train_data)} train / {len(dev_data)} dev rows, {what}; {r}x{c} "
        f"blocks for target {target} (kernel path {target_isa(target)}); {steps} student steps"
        + ("" if has_head or embedding else f" after {plan.teacher_steps} teacher fine-tune steps")
    )
    return plan


# --------------------------------------------------------------------------------------------
# Batches, evaluation


def _encode(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_len: int, tensors: str):
    columns = list(zip(*texts, strict=True))
    second = list(columns[1]) if len(columns) > 1 else None
    return tokenizer(
        list(columns[0]),
        second,
        padding=True,
        truncation=True,
        max_length=max_len,
        return_tensors=tensors,
    )


def _token_lengths(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_len: int) -> list[int]:
    columns = list(zip(*texts, strict=True))
    second = list(columns[1]) if len(columns) > 1 else None
    encoded = tokenizer(list(columns[0]), second, truncation=True, max_length=max_len)
    return [len(ids) for ids in encoded["input_ids"]]


def batches_of(
    tokenizer: Any,
    data: LabeledData,
    batch_size: int,
    max_len: int,
    seed: int | None = None,
    group_by_length: bool = False,
) -> list[dict[str, Any]]:
    """Tokenized batches (padded per batch); shuffled with ``seed``, in order without.
    ``group_by_length``: each batch holds rows of one token length (far less padding; see
    :mod:`fastonnx.compress.batching`)."""
    from fastonnx.compress.batching import length_grouped_batches, random_batches

    torch = require_torch()
    if group_by_length and len(data):
        lengths = _token_lengths(tokenizer, data.texts, max_len)
        groups = length_grouped_batches(lengths, batch_size, seed)
    else:
        groups = random_batches(len(data), batch_size, seed)
    out = []
    for index in groups:
        batch = dict(_encode(tokenizer, [data.texts[i] for i in index], max_len, "pt"))
        batch["labels"] = torch.tensor([data.labels[i] for i in index])
        out.append(batch)
    return out


def torch_accuracy(model: Any, batches: Sequence[dict[str, Any]]) -> float:
    torch = require_torch()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            correct += int((model(**inputs).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return correct / total


def onnx_accuracy(path: Path, tokenizer: Any, data: LabeledData, max_len: int, fast: bool) -> float:
    import onnxruntime as ort

    import fastonnx

    if fast:
        session = fastonnx.make_session(path, 1)
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    correct = 0
    for start in range(0, len(data), 32):
        encoded = _encode(tokenizer, data.texts[start : start + 32], max_len, "np")
        feed = {n: encoded[n].astype(np.int64) for n in names}
        logits = session.run(None, feed)[0]
        correct += int((logits.argmax(-1) == np.asarray(data.labels[start : start + 32])).sum())
    return correct / len(data)


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress bar with ETA on a terminal; a line every 10% otherwise."""

    def __init__(self, total: int, done: int = 0, label: str = "prune + distill") -> None:
        self.total, self.first, self.label = total, done, label
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_tenth = -1

    def __call__(self, done: int, loss: float, sparsity: float) -> None:
        elapsed = time.perf_counter() - self.start
        rate = elapsed / max(1, done - self.first)
        eta = rate * (self.total - done)
        width = 30
        filled = round(width * done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"[{self.label}] [{bar}] {done}/{self.total}  loss {loss:.4f}  sparsity "
            f"{sparsity:5.1%}  {rate:.2f} s/step  eta {_duration(eta)}"
        )
        if self.tty:
            end = "\n" if done == self.total else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif done * 10 // self.total != self._last_tenth or done == self.total:
            self._last_tenth = done * 10 // self.total
            print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Atomic outputs


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _tmp_dir(out: Path, name: str) -> Path:
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class CompressResult:
    output: Path
    report: dict[str, Any]
    stopped: bool = False  # --stop-after ended the run early (a checkpoint is there)


def _linear_warmup_decay(optimizer: Any, steps: int, warmup_fraction: float = 0.1):
    torch = require_torch()
    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_output(config: CompressConfig) -> None:
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise CompressError(f"{out} exists and is not a folder")
    if config.resume and config.force:
        raise CompressError("--resume and --force exclude each other")
    if not out.exists() or config.force:
        return
    if (out / "report.json").exists() and not config.resume:
        raise CompressError(f"{out} holds a finished run; pass --force to redo it")
    if checkpoint.exists(out / "checkpoint") and not config.resume:
        raise CompressError(
            f"{out} holds a checkpoint of an interrupted run; pass --resume to continue it or "
            "--force to start over"
        )


def _teacher(plan: Plan, out: Path, log: Callable[[str], None]) -> Any:
    """The model itself when it has a head (or is an embedding model, wrapped to return its
    pooled vector); else fine-tuned once into ``out/teacher``."""
    if plan.embedding:
        from fastonnx.compress.embedding import pooled

        return pooled(plan.model, plan.pooling).eval()
    if plan.has_head:
        return plan.model
    transformers = require_transformers()
    torch = require_torch()
    from fastonnx.compress.distill import DistillConfig, train

    folder = out / "teacher"
    if (folder / "config.json").exists():
        log(f"[compress] reusing the fine-tuned teacher in {folder}")
        return transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    config = plan.config
    log(f"[compress] {config.model} has no classification head: fine-tuning one first")
    torch.manual_seed(config.seed)
    model = plan.model
    batches = batches_of(
        plan.tokenizer, plan.train, config.batch_size, config.max_len, seed=config.seed
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.teacher_lr, weight_decay=0.01)
    progress = Progress(plan.teacher_steps, label="teacher fine-tune")
    train(
        model,
        None,
        batches,
        steps=plan.teacher_steps,
        optimizer=optimizer,
        config=DistillConfig(alpha_task=1.0, alpha_kd=0.0),
        lr_scheduler=_linear_warmup_decay(optimizer, plan.teacher_steps),
        log=lambda _line: None,
        on_step=lambda done, parts: progress(done, float(parts.total.detach()), 0.0),
    )
    tmp = _tmp_dir(out, "teacher")
    model.save_pretrained(tmp)
    plan.tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, folder)
    return model.eval()


def compress(config: CompressConfig, log: Callable[[str], None] | None = None) -> CompressResult:
    """Run the whole pipeline (see the module docstring); bad input raises before training."""
    log = log or _stderr
    _check_output(config)
    plan = prepare(config, log)
    torch = require_torch()
    from fastonnx.compress.distill import DistillConfig, train
    from fastonnx.compress.length_drop import LengthDrop
    from fastonnx.compress.pruning import BlockPruner
    from fastonnx.compress.schedule import CubicSchedule

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(config.output)
    if config.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teacher = _teacher(plan, out, log)
    torch.manual_seed(config.seed)
    student = copy.deepcopy(teacher)
    steps = plan.steps
    schedule = CubicSchedule(
        final_sparsity=config.sparsity,
        begin_step=0,
        end_step=max(1, round(config.prune_end_fraction * steps)),
        frequency=max(1, steps // 20),
    )
    pruner = BlockPruner(
        student,
        schedule,
        block_shape=plan.block_shape,
        target=config.target,
        scope=config.scope,
        criterion=config.criterion,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.01)
    scheduler = _linear_warmup_decay(optimizer, steps)
    batches = batches_of(
        plan.tokenizer,
        plan.train,
        config.batch_size,
        config.max_len,
        seed=config.seed + 1,
        group_by_length=config.group_by_length,
    )
    ckpt = out / "checkpoint"
    done = 0
    if config.resume and checkpoint.exists(ckpt):
        try:
            done = checkpoint.load(
                ckpt,
                fingerprint=plan.fingerprint,
                model=student,
                optimizer=optimizer,
                scheduler=scheduler,
                pruner=pruner,
            )
        except checkpoint.CheckpointError as exc:
            raise CompressError(str(exc)) from None
        log(f"[compress] resuming from {ckpt} after step {done}/{steps}")
    elif config.resume:
        log(f"[compress] no checkpoint in {ckpt}: starting from the beginning")
    last = steps if config.stop_after is None else min(steps, done + config.stop_after)

    if plan.embedding:
        distill = DistillConfig(
            alpha_task=0.0,
            alpha_kd=0.0,
            alpha_hidden=config.alpha_hidden,
            alpha_cosine=config.alpha_cosine,
        )
    else:
        distill = DistillConfig(
            temperature=config.temperature,
            alpha_task=config.alpha_task,
            alpha_kd=config.alpha_kd,
            alpha_hidden=config.alpha_hidden,
        )
    progress = Progress(steps, done)

    def on_step(step: int, parts: Any) -> None:
        progress(step, float(parts.total.detach()), pruner.sparsity)
        if step % config.checkpoint_every == 0 or step == last:
            checkpoint.save(
                ckpt,
                step=step,
                fingerprint=plan.fingerprint,
                model=student,
                optimizer=optimizer,
                scheduler=scheduler,
                pruner=pruner,
            )

    if done < last:
        train(
            student,
            teacher,
            batches,
            steps=last,
            optimizer=optimizer,
            pruner=pruner,
            config=distill,
            lr_scheduler=scheduler,
            log=lambda _line: None,
            start_step=done,
            on_step=on_step,
            length_drop=(
                LengthDrop(max_drop=config.length_drop, seed=config.seed)
                if config.length_drop
                else None
            ),
        )
    if last < steps:
        log(f"[compress] stopped after step {last}/{steps}; continue with --resume")
        return CompressResult(out, {}, stopped=True)
    pruner.apply_masks()
    finish = _finish_embedding if plan.embedding else _finish
    report = finish(plan, teacher, student, pruner, out, log)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    _write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_text(out / "report.md", format_report(report))
    shutil.rmtree(ckpt, ignore_errors=True)  # the run is complete: nothing to resume
    log(format_report(report))
    return CompressResult(out, report)


def _finish(
    plan: Plan, teacher: Any, student: Any, pruner: Any, out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Save the student, export and optimize it, measure everything on the dev split."""
    config = plan.config
    tmp = _tmp_dir(out, "student")
    student.save_pretrained(tmp)
    plan.tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out / "student")
    exported, optimized = _export_and_optimize(plan, student, pruner, out, "logits", log)
    onnx_dir = out / "onnx"

    dev = batches_of(plan.tokenizer, plan.dev, 64, config.max_len)
    accuracy = {
        "teacher (PyTorch fp32)": torch_accuracy(teacher, dev),
        "student (PyTorch fp32)": torch_accuracy(student, dev),
        "student (ONNX fp32, ORT)": onnx_accuracy(
            onnx_dir / "student.onnx", plan.tokenizer, plan.dev, config.max_len, fast=False
        ),
        "student (fastonnx sparse int8)": onnx_accuracy(
            onnx_dir / "student.fast.onnx", plan.tokenizer, plan.dev, config.max_len, fast=True
        ),
    }
    report = _common_report(plan, pruner, exported, optimized)
    report["speed"] = _speed(plan, out, log)
    report["num_labels"] = plan.train.num_labels
    report["teacher"] = str(config.model) if plan.has_head else str(out / "teacher")
    report["dev_accuracy"] = accuracy
    return report


def _export_and_optimize(
    plan: Plan, model: Any, pruner: Any, out: Path, output: str, log: Callable[[str], None]
) -> tuple[Any, Any]:
    """``out/onnx``: the fp32 export (sparsity checked), calibration feeds, the optimized
    model; returns (export record, optimize result)."""
    import fastonnx
    from fastonnx.compress.export import export_pruned

    config = plan.config
    tmp = _tmp_dir(out, "onnx")
    exported = export_pruned(
        model,
        tmp / "student.onnx",
        pruner,
        output=output,
        dynamo=config.exporter == "dynamo",
        log=log,
    )
    names = _onnx_input_names(exported.path)
    calibration = tmp / "calibration.npz"
    encoded = _encode(
        plan.tokenizer, plan.train.texts[: config.calibration_samples], config.max_len, "np"
    )
    np.savez(calibration, **{n: encoded[n].astype(np.int64) for n in names})
    optimized = fastonnx.optimize(exported.path, preset="sparse-int8", calibration=calibration)
    optimized.save(tmp / "student.fast.onnx")
    _replace_dir(tmp, out / "onnx")
    return exported, optimized


def _speed(plan: Plan, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The student through fastonnx against the dense model (see fastonnx.compress.speed); a
    failed measurement is reported, never fatal: the trained student is already saved."""
    from fastonnx.compress.speed import speed_vs_dense

    log("[compress] timing the student against the dense model")
    texts = [t[0] for t in plan.dev.texts] or [t[0] for t in plan.train.texts]
    try:
        return speed_vs_dense(
            out / "onnx" / "student.onnx",
            out / "onnx" / "student.fast.onnx",
            plan.tokenizer,
            texts,
            plan.config.max_len,
        )
    except Exception as exc:  # noqa: BLE001 - reported in the speed line
        return {"error": f"{type(exc).__name__}: {exc}"}


def _common_report(plan: Plan, pruner: Any, exported: Any, optimized: Any) -> dict[str, Any]:
    config = plan.config
    r, c = plan.block_shape
    return {
        "mode": config.mode,
        "model": str(config.model),
        "data": str(config.data),
        "train_rows": len(plan.train),
        "dev_rows": len(plan.dev),
        "sparsity": config.sparsity,
        "block_shape": f"{r}x{c}",
        "target": config.target,
        "target_kernel_path": target_isa(config.target),
        "steps": plan.steps,
        "settings": {
            k: v for k, v in dataclasses.asdict(config).items() if k in config._TRAINING_FIELDS
        },
        "exporter": exported.exporter,
        "lowered_layers": len(optimized.report.lowered),
        "overall_sparsity": pruner.overall_sparsity(),
        "layers": {
            x.layer: {"zero_blocks": x.measured.zero_blocks, "blocks": x.measured.blocks}
            for x in exported.layers
        },
        "files": {
            "student": "student",
            "onnx": "onnx/student.onnx",
            "fastonnx": "onnx/student.fast.onnx",
        },
    }


def _finish_embedding(
    plan: Plan, teacher: Any, student: Any, pruner: Any, out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Embedding mode: save, export (last_hidden_state), optimize; cosine to the teacher's
    vectors on the held-out sentences."""
    from fastonnx.compress.embedding import cosines, onnx_vectors, torch_vectors

    config = plan.config
    encoder = student.encoder
    tmp = _tmp_dir(out, "student")
    encoder.save_pretrained(tmp)
    plan.tokenizer.save_pretrained(tmp)
    pooling_config = Path(config.model) / "1_Pooling"
    if pooling_config.is_dir():
        shutil.copytree(pooling_config, tmp / "1_Pooling")
    _replace_dir(tmp, out / "student")
    exported, optimized = _export_and_optimize(plan, encoder, pruner, out, "last_hidden_state", log)
    dev = batches_of(plan.tokenizer, plan.dev, 64, config.max_len)
    texts = [t[0] for t in plan.dev.texts]
    reference = torch_vectors(teacher, dev)
    vectors = {
        "student (PyTorch fp32)": torch_vectors(student, dev),
        "student (fastonnx sparse int8)": onnx_vectors(
            out / "onnx" / "student.fast.onnx",
            plan.tokenizer,
            texts,
            config.max_len,
            plan.pooling,
            fast=True,
        ),
    }
    report = _common_report(plan, pruner, exported, optimized)
    report["speed"] = _speed(plan, out, log)
    report["pooling"] = plan.pooling
    report["cosine_to_teacher"] = {
        name: {
            "mean": float(cosines(v, reference).mean()),
            "min": float(cosines(v, reference).min()),
        }
        for name, v in vectors.items()
    }
    return report


def _onnx_input_names(path: Path) -> list[str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [i.name for i in session.get_inputs()]


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: accuracy (or cosine) table, then per-layer sparsity."""
    lines = [
        f"# fastonnx compress: {report['model']}",
        "",
        f"{report['sparsity']:.0%} target sparsity in {report['block_shape']} blocks (target "
        f"{report['target']}, kernel path {report['target_kernel_path']}), {report['steps']} "
        f"steps; {report['train_rows']} train / {report['dev_rows']} dev rows of {report['data']}",
        "",
    ]
    if report.get("mode") == "embedding":
        lines += ["| model | mean cosine to teacher | min |", "|---|---|---|"]
        for name, value in report["cosine_to_teacher"].items():
            lines.append(f"| {name} | {value['mean']:.4f} | {value['min']:.4f} |")
    else:
        acc = report["dev_accuracy"]
        teacher = acc["teacher (PyTorch fp32)"]
        lines += ["| model | dev accuracy | vs teacher |", "|---|---|---|"]
        for name, value in acc.items():
            lines.append(f"| {name} | {value:.2%} | {100 * (value - teacher):+.2f} points |")
    lines += ["", "| layer | zero blocks | sparsity |", "|---|---|---|"]
    for name, layer in report["layers"].items():
        zero, total = layer["zero_blocks"], layer["blocks"]
        lines.append(f"| {name} | {zero}/{total} | {zero / total:.1%} |")
    lines.append(f"| overall | | {report['overall_sparsity']:.1%} |")
    if "speed" in report:
        from fastonnx.compress.speed import format_speed

        lines += ["", format_speed(report["speed"])]
    return "\n".join(lines) + "\n"


__all__ = [
    "CompressConfig",
    "CompressError",
    "CompressResult",
    "DataError",
    "compress",
    "format_report",
    "prepare",
]
