"""``fastonnx compress``: prune + distill a local Hugging Face model on the user's labeled text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_EPILOG = """\
data: a .csv/.tsv file with a header row, or .jsonl (one JSON object a line); one text column
(or two, for sentence pairs) and a label column of class ids 0..L-1. --mode embedding: unlabeled
sentences (.txt, one a line, or the text column of a .csv/.jsonl); the report gives the cosine
of the student's pooled vectors to the teacher's on held-out sentences.

model: a local Hugging Face folder (config.json, weights, tokenizer). A model with a
sequence-classification head is the teacher; a bare encoder is fine-tuned into one first.

outputs (in -o OUT, each written atomically; report.json last):
  OUT/student/                 the pruned student (weights + tokenizer)
  OUT/onnx/student.onnx        fp32 ONNX, checked to carry the block sparsity
  OUT/onnx/student.fast.onnx   fastonnx sparse INT8 (needs fastonnx's ops to run)
  OUT/report.json, report.md   dev accuracy: teacher, student fp32, student via fastonnx;
                               per-layer sparsity
  OUT/checkpoint/              while training: --resume continues from it

exit status: 0 done, 2 bad input or options (found before training starts), 130 interrupted.

example:
  fastonnx compress ./my-model reviews.csv -o ./my-model-80 --sparsity 0.8 \\
      --text-column review --label-column stars --target avx512_vnni
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fastonnx.compress.pruning import TARGETS

    parser = subparsers.add_parser(
        "compress",
        help="prune + distill a Hugging Face model into a block-sparse student (needs [train])",
        description="Block-prune and distill a local Hugging Face encoder on labeled text, "
        "export it, run fastonnx optimize, and report dev accuracy and sparsity.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="Hugging Face folder")
    parser.add_argument("data", type=Path, metavar="DATA", help=".csv, .tsv or .jsonl")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="folder")
    parser.add_argument(
        "--mode",
        choices=["labeled", "embedding"],
        default="labeled",
        help="labeled: a classifier on labeled rows (default); embedding: distill an encoder's "
        "pooled sentence vector on unlabeled sentences (.txt one a line, or --text-column)",
    )
    columns = parser.add_argument_group("data columns")
    columns.add_argument(
        "--text-column",
        action="append",
        metavar="NAME",
        help="text column (give twice for sentence pairs; default: text)",
    )
    columns.add_argument("--label-column", default="label", metavar="NAME", help="default: label")
    columns.add_argument(
        "--dev-fraction", type=float, default=0.1, help="held out for the report (default 0.1)"
    )
    prune = parser.add_argument_group("pruning")
    prune.add_argument("--sparsity", type=float, default=0.8, help="in [0, 1) (default 0.8)")
    prune.add_argument(
        "--target",
        default="auto",
        choices=TARGETS,
        help="CPU the model will run on; sets the block shape (default: auto, this CPU)",
    )
    prune.add_argument("--block-shape", metavar="RxC", help="e.g. 1x4, 16x4 (default: --target's)")
    prune.add_argument("--scope", choices=["layer", "global"], default="layer")
    prune.add_argument(
        "--criterion",
        choices=["fisher", "magnitude"],
        default="fisher",
        help="how blocks are ranked: fisher (default: w^2 * E[g^2] from the training "
        "gradients, the estimated loss increase), or magnitude",
    )
    prune.add_argument(
        "--prune-end",
        type=float,
        default=0.4,
        help="part of training at which the sparsity ramp ends (default 0.4)",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, help="student steps (default: --epochs of the data)")
    train.add_argument("--epochs", type=float, default=2.0)
    train.add_argument("--teacher-epochs", type=float, default=2.0, help="a model without head")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--max-len", type=int, default=128, help="tokens per row (default 128)")
    train.add_argument("--lr", type=float, default=2e-4, help="student LR (default 2e-4)")
    train.add_argument("--teacher-lr", type=float, default=5e-5)
    train.add_argument("--temperature", type=float, default=2.0)
    train.add_argument("--alpha-task", type=float, default=0.5)
    train.add_argument("--alpha-kd", type=float, default=0.5)
    train.add_argument("--alpha-hidden", type=float, default=0.1)
    train.add_argument("--alpha-cosine", type=float, default=1.0, help="embedding mode")
    train.add_argument(
        "--no-group-by-length",
        dest="group_by_length",
        action="store_false",
        help="random student batches (default: batches of one token length, about half the "
        "padding and a cheaper step)",
    )
    train.add_argument(
        "--length-drop",
        type=float,
        default=0.0,
        metavar="P",
        help="LengthDrop training: each step also trains sub-models whose layers each drop up "
        "to P of their tokens (0.2-0.3 typical), so `fastonnx optimize --length-config` runs "
        "them accurately (default 0: off; labeled mode)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    run = parser.add_argument_group("checkpoints and outputs")
    run.add_argument("--checkpoint-every", type=int, default=50, metavar="N")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    run.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps this run")
    run.add_argument("--force", action="store_true", help="redo OUT from the start")
    run.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    run.add_argument("--calibration-samples", type=int, default=64)
    parser.set_defaults(func=run_command)
    return parser


def _fail(message: str) -> int:
    print(f"fastonnx compress: error: {message}", file=sys.stderr)
    return 2


def run_command(args: argparse.Namespace) -> int:
    from fastonnx.compress.pipeline import CompressConfig, compress
    from fastonnx.model_io import InputError

    config = CompressConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        text_columns=tuple(args.text_column or ["text"]),
        label_column=args.label_column,
        sparsity=args.sparsity,
        block_shape=args.block_shape,
        target=args.target,
        steps=args.steps,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        teacher_lr=args.teacher_lr,
        prune_end_fraction=args.prune_end,
        temperature=args.temperature,
        alpha_task=args.alpha_task,
        alpha_kd=args.alpha_kd,
        alpha_hidden=args.alpha_hidden,
        scope=args.scope,
        criterion=args.criterion,
        dev_fraction=args.dev_fraction,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after,
        resume=args.resume,
        force=args.force,
        exporter=args.exporter,
        length_drop=args.length_drop,
        calibration_samples=args.calibration_samples,
        threads=args.threads,
        mode=args.mode,
        alpha_cosine=args.alpha_cosine,
        group_by_length=args.group_by_length,
    )
    try:
        result = compress(config)
    except InputError as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or args.output}")
    if result.stopped:
        return 0
    print(f"wrote {result.output / 'report.md'}")
    return 0
