"""`fastonnx triton-repo`: a Triton Inference Server model repository for an ONNX encoder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "triton-repo",
        help="write a Triton Inference Server model repository (onnxruntime backend)",
        description="Write OUT_DIR/NAME/config.pbtxt (onnxruntime backend, inputs and outputs "
        "read from the model, KIND_CPU instances, model_operations naming fastonnx's "
        "custom-op library and, for a tokenizer-inside model, onnxruntime-extensions') and "
        "OUT_DIR/NAME/1/model.onnx, with the libraries copied beside the config. The config is "
        "checked by parsing it with Triton's own ModelConfig schema (from tritonclient).",
        epilog="example: fastonnx triton-repo model.fast.onnx models/ --name minilm "
        "--instances 2 --server-repo-path /models   # then: tritonserver --model-repository "
        "/models",
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--name", help="model name (default: the file name up to its first '.')")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="KIND_CPU instances")
    p.add_argument("--threads", type=int, metavar="T", help="ORT intra-op threads per instance")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        metavar="N",
        help="> 0: Triton batches requests (dynamic_batching) along a dynamic first dimension",
    )
    p.add_argument(
        "--server-repo-path",
        metavar="PATH",
        help="where the server sees OUT_DIR (default: its absolute path here; e.g. /models)",
    )
    p.add_argument(
        "--extensions-library",
        type=Path,
        metavar="SO",
        help="a standalone libortextensions.so build, for a model with the tokenizer inside",
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/NAME")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastonnx.serving.triton import TritonRepoError, write_repository

    try:
        report = write_repository(
            args.model,
            args.out_dir,
            name=args.name,
            instances=args.instances,
            threads=args.threads,
            max_batch_size=args.max_batch_size,
            server_repo_path=args.server_repo_path,
            extensions_library=args.extensions_library,
            force=args.force,
        )
    except TritonRepoError as exc:
        print(f"fastonnx triton-repo: error: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0
