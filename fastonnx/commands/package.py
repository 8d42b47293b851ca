"""`fastonnx package`: the tokenizer (and pooling) inside the model, so it takes strings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "package",
        help="put the tokenizer (and pooling) inside the model: strings in, vectors out",
        description="Prepend the model's Hugging Face tokenizer as onnxruntime-extensions ops "
        "and, for encoders that return token states, append the pooling and normalization of "
        "its sentence-transformers configuration. The result takes one text (string tensor "
        "[1]) and returns its embedding [1, D] (or the model's logits); run it with "
        "onnxruntime-extensions' library registered (and fastonnx's when it holds fastonnx "
        "ops).",
        epilog="example: fastonnx package model.fast.onnx --tokenizer all-MiniLM-L6-v2/ "
        "-o model.text.onnx",
    )
    p.add_argument("input", type=Path, metavar="MODEL.onnx")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    p.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        metavar="DIR",
        help="the Hugging Face model folder with the tokenizer (and its "
        "sentence-transformers pooling config)",
    )
    p.add_argument(
        "--pooling",
        choices=["auto", "mean", "cls", "none"],
        default="auto",
        help="pooling of token states (auto: the folder's config, else mean)",
    )
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalize embeddings")
    p.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="truncate texts to N tokens (default: the tokenizer's maximum, <= 512, capped by the "
        "model's max_position_embeddings in the tokenizer folder's config.json)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastonnx.calibration import load_tokenizer
    from fastonnx.model_io import InputError, external_data_files, load_model, save_model
    from fastonnx.package import PackageError, package

    try:
        model = load_model(args.input)
        report = package(
            model,
            load_tokenizer(args.tokenizer),
            pooling=None if args.pooling == "auto" else args.pooling,
            normalize=False if args.no_normalize else None,
            max_length=args.max_length,
            config_dir=args.tokenizer,
        )
        protect = [args.input, *external_data_files(args.input)]
        save_model(model, args.output, protect=protect)
    except (InputError, PackageError) as exc:
        print(f"fastonnx package: error: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    print(f"wrote {args.output}")
    return 0
