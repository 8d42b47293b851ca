"""Recipe: a block-sparse student, pruned gradually while distilled from the dense teacher.

    python models/student.py --sparsity 0.9 [--target auto|avx512_vnni|amx|avx2]
                             [--block-shape 1x4] [--cache DIR] [--tiny | --full]

Runs the teacher recipe first for whatever of it is missing. The student starts as a copy of
the teacher; its encoder's linear layers are block-pruned (blocks ranked by the recipe's
criterion: Fisher by default) along a cubic schedule (Zhu & Gupta)
that reaches ``--sparsity`` part-way through training, the rest of the steps recovering
accuracy, with the loss of :func:`fastonnx.compress.distillation_loss` (labels + the teacher's
soft targets + hidden states). Outputs, under ``<cache>/<mode>/student-<percent>/``:
``model`` (weights + tokenizer), ``metrics.json`` (dev accuracy, per-layer sparsity), and
``onnx/model.onnx`` (output ``logits``), checked to carry the same block sparsity.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import common
import teacher as teacher_recipe


def student_dir(args: argparse.Namespace) -> Path:
    tag = f"-{args.tag}" if getattr(args, "tag", None) else ""
    return common.run_dir(args) / f"student-{round(args.sparsity * 100)}{tag}"


def distillation_text(args, settings: common.Settings, split: common.Split):
    """The student's training sentences and labels: the labeled train split plus
    ``settings.extra_sentences`` unlabeled ones (label -100: the teacher's soft targets only)."""
    texts, labels = list(split.train_texts), list(split.train_labels)
    count = settings.extra_sentences
    if count:
        seen = [*split.train_texts, *split.dev_texts]
        if args.tiny:
            pool, _ = common.synthetic_polarity(count + len(seen), seed=args.seed + 7)
            extra = [t for t in pool if t not in set(seen)][:count]
        else:
            reviews = common.download_reviews(args.cache)
            extra = common.review_sentences(reviews, count, seen, seed=args.seed)
        texts += extra
        labels += [-100] * len(extra)
        print(f"[student] {len(split.train_texts)} labeled + {len(extra)} unlabeled sentences")
    return texts, labels


def prune_and_distill(args, paths: teacher_recipe.TeacherPaths, out: Path) -> dict:
    import torch

    from fastonnx.compress import BlockPruner, CubicSchedule, DistillConfig, train

    settings = common.settings_for(args)
    split = common.load_split(paths.split)
    teacher, tokenizer = teacher_recipe.load_teacher(paths)
    start, initial = None, settings.initial_sparsity
    if settings.init_from:
        start = common.run_dir(args) / settings.init_from / "model"
    elif 0 < settings.chain_from < args.sparsity:
        # The less sparse student of the same recipe and block shape, built first if missing.
        base = argparse.Namespace(**{**vars(args), "sparsity": settings.chain_from, "force": False})
        ensure_student(base)
        start, initial = student_dir(base) / "model", settings.chain_from
    if start is not None:
        from transformers import AutoModelForSequenceClassification

        print(f"[student] starting from {start}")
        student = AutoModelForSequenceClassification.from_pretrained(start)
    else:
        student = copy.deepcopy(teacher)
    steps = settings.student_steps
    schedule = CubicSchedule(
        final_sparsity=args.sparsity,
        begin_step=0,
        end_step=max(1, round(settings.prune_end_fraction * steps)),
        frequency=settings.prune_frequency,
        initial_sparsity=min(initial, args.sparsity),
    )
    pruner = BlockPruner(
        student,
        schedule,
        block_shape=args.block_shape,
        target=args.target,
        scope=settings.scope,
        criterion=settings.criterion,
    )
    print(f"[student] {pruner.describe()}, schedule {schedule}")
    torch.manual_seed(args.seed)
    texts, labels = distillation_text(args, settings, split)
    batches = common.batches_of(
        tokenizer,
        texts,
        labels,
        settings.batch_size,
        settings.max_len,
        seed=args.seed + 1,
        group_by_length=settings.group_by_length,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.student_lr, weight_decay=0.01)
    config = DistillConfig(
        temperature=settings.temperature,
        alpha_task=settings.alpha_task,
        alpha_kd=settings.alpha_kd,
        alpha_hidden=settings.alpha_hidden,
    )
    with common.timed(f"prune + distill to {args.sparsity:.0%}, {steps} steps"):
        result = train(
            student,
            teacher,
            batches,
            steps=steps,
            optimizer=optimizer,
            pruner=pruner,
            config=config,
            lr_scheduler=teacher_recipe.linear_warmup_decay(
                optimizer, steps, settings.warmup_fraction
            ),
            log_every=max(1, steps // 10),
        )
    print(pruner.report())
    with common.timed("student dev accuracy"):
        dev = common.batches_of(tokenizer, split.dev_texts, split.dev_labels, 64, settings.max_len)
        acc = common.accuracy(student, dev)
    print(f"[student] dev accuracy {acc:.4f}")
    with common.atomic_dir(out / "model", force=True) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {
        "dev_accuracy": acc,
        "target_sparsity": args.sparsity,
        "block_shape": list(pruner.block_shape),
        "target": args.target,
        "overall_sparsity": result.sparsity,
        "steps": steps,
        "settings": dataclasses.asdict(settings),
        "train_seconds": round(result.seconds, 1),
        "final_loss": result.losses[-1],
        "layers": {x.name: x.sparsity for x in pruner.layer_sparsity()},
    }


def ensure_student(args: argparse.Namespace) -> Path:
    """Run whatever of the student recipe is missing; return its ONNX path."""
    from fastonnx.compress.schedule import check_sparsity

    check_sparsity(args.sparsity)
    common.resolve_target_args(args)
    # The student's --force redoes the student only.
    paths = teacher_recipe.ensure_teacher(argparse.Namespace(**{**vars(args), "force": False}))
    out = student_dir(args)
    metrics_path = out / "metrics.json"
    force = args.force
    if metrics_path.exists() and tuple(common.read_json(metrics_path)["block_shape"]) != tuple(
        args.block_shape
    ):
        print(f"[student] {out} was pruned with another block shape: redoing it", flush=True)
        force = True
    if common.needed(metrics_path, force):
        common.write_json(metrics_path, prune_and_distill(args, paths, out))
    metrics = common.read_json(metrics_path)
    print(f"[student] dev accuracy {metrics['dev_accuracy']:.4f} at {args.sparsity:.0%}")
    onnx_path = out / "onnx" / "model.onnx"
    if common.needed(onnx_path, force):
        from transformers import AutoModelForSequenceClassification

        from fastonnx.compress import export_pruned
        from fastonnx.compress.pruning import format_report

        model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
        block = tuple(metrics["block_shape"])
        with (
            common.timed("student ONNX export + sparsity check"),
            common.atomic_dir(onnx_path.parent, force=True) as tmp,
        ):
            exported = export_pruned(model, tmp / onnx_path.name, block_shape=block)
            print(f"[student] block sparsity in the ONNX file, {exported.exporter} exporter:")
            print(format_report(x.measured for x in exported.layers))
            sparsity = {x.layer: x.measured.sparsity for x in exported.layers}
            blocks = {x.layer: [x.measured.zero_blocks, x.measured.blocks] for x in exported.layers}
            common.write_json(
                tmp / "sparsity.json",
                {
                    "block_shape": block,
                    "target": metrics.get("target"),
                    "layers": sparsity,
                    "zero_blocks": blocks,
                },
            )
    print(f"[student] {onnx_path}")
    return onnx_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prune + distill a block-sparse student from the teacher; export to ONNX.",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        required=True,
        help="target block sparsity in [0, 1), e.g. 0.8 or 0.9",
    )
    common.add_target_args(parser)
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one recipe setting (models/common.py Settings), e.g. student_lr=3e-4",
    )
    parser.add_argument("--tag", help="suffix of the output folder (experiments side by side)")
    common.add_common_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with common.timed(f"student recipe ({args.sparsity:.0%})"):
        ensure_student(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
