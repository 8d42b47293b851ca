"""`fastonnx serve`: an HTTP JSON endpoint for an encoder on Ray Serve (texts in, vectors or
labels out), N replicas, batching and autoscaling passed through to Ray."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SERVE_EXTRA_HINT = "pip install 'fastonnx[serve]' (Ray Serve is an optional extra)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve an encoder over HTTP on Ray Serve (texts in; embeddings or labels out)",
        description='Serve MODEL on Ray Serve: POST {"texts": [...]} to / (or /encode) for '
        '{"embeddings": ...} or a classifier\'s {"labels": ..., "logits": ...}; GET /health. '
        "Each replica holds its own ORT session with fastonnx's custom-op library registered "
        "(and onnxruntime-extensions' for a model with the tokenizer inside). Runs until "
        "Ctrl-C (or --duration); on a Ray cluster with --address.",
        epilog="example: fastonnx serve model.fast.onnx --tokenizer all-MiniLM-L6-v2/ "
        "--replicas 2 --threads 1",
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="Hugging Face tokenizer folder (not for a model with the tokenizer inside)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="truncate texts to N tokens (default: the tokenizer's maximum, <= 512, capped by the "
        "model's max_position_embeddings in the tokenizer folder's config.json)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="an existing Ray cluster (e.g. auto, or HEAD_IP:6379); default: a local one",
    )
    p.add_argument("--name", default=None, help="Serve application name (default fastonnx)")
    g = p.add_argument_group("replicas")
    g.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (default 1)")
    g.add_argument("--threads", type=int, default=1, metavar="T", help="ORT threads per replica")
    g.add_argument(
        "--replica-cpus",
        type=float,
        metavar="C",
        help="Ray CPUs reserved per replica (default: --threads)",
    )
    g.add_argument("--max-ongoing-requests", type=int, default=16, metavar="N")
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        metavar="N",
        help="requests grouped into one model call (serve.batch; 1: no grouping)",
    )
    g.add_argument("--batch-wait-timeout-s", type=float, default=0.005, metavar="S")
    g.add_argument(
        "--max-replicas",
        type=int,
        metavar="N",
        help="autoscale between --min-replicas and N (starting at --replicas)",
    )
    g.add_argument("--min-replicas", type=int, metavar="N", help="default: --replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=2.0, metavar="R")
    g = p.add_argument_group("request limits")
    g.add_argument("--max-texts", type=int, default=256, metavar="N", help="texts per request")
    g.add_argument(
        "--max-text-chars", type=int, default=10_000, metavar="N", help="characters per text"
    )
    g.add_argument(
        "--max-body-bytes", type=int, default=4 << 20, metavar="N", help="request body size"
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="stop after S seconds (default: until Ctrl-C)",
    )
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> str | None:
    positive = {
        "--replicas": args.replicas,
        "--threads": args.threads,
        "--max-ongoing-requests": args.max_ongoing_requests,
        "--max-batch-size": args.max_batch_size,
        "--max-texts": args.max_texts,
        "--max-text-chars": args.max_text_chars,
        "--max-body-bytes": args.max_body_bytes,
    }
    for name, value in positive.items():
        if value < 1:
            return f"{name} must be >= 1, got {value}"
    if args.max_length is not None and args.max_length < 2:
        return f"--max-length must be >= 2 ([CLS] and [SEP]), got {args.max_length}"
    if args.batch_wait_timeout_s < 0:
        return f"--batch-wait-timeout-s must be >= 0, got {args.batch_wait_timeout_s}"
    if not 0 < args.port < 65536:
        return f"--port must be in 1..65535, got {args.port}"
    if args.replica_cpus is not None and args.replica_cpus < 0:
        return f"--replica-cpus must be >= 0, got {args.replica_cpus}"
    if args.max_replicas is not None:
        low = args.replicas if args.min_replicas is None else args.min_replicas
        if not 0 <= low <= args.replicas <= args.max_replicas:
            return (
                "autoscaling needs --min-replicas <= --replicas <= --max-replicas, got "
                f"{low}, {args.replicas}, {args.max_replicas}"
            )
    elif args.min_replicas is not None:
        return "--min-replicas needs --max-replicas (autoscaling)"
    if args.duration is not None and args.duration <= 0:
        return f"--duration must be > 0, got {args.duration}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"fastonnx serve: error: {problem}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        print(
            f"fastonnx serve: error: Ray Serve is not installed: {SERVE_EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2
    from fastonnx.serving.backend import BackendError, load_text_model
    from fastonnx.serving.ray_app import APP_NAME, ServeOptions, build_app

    model = args.model.resolve()
    tokenizer = str(args.tokenizer.resolve()) if args.tokenizer else None
    try:  # fail here, with one line, rather than in every replica's constructor
        load_text_model(model, tokenizer, threads=1, max_length=args.max_length)
    except BackendError as exc:
        print(f"fastonnx serve: error: {exc}", file=sys.stderr)
        return 2
    options = ServeOptions(
        model=str(model),
        tokenizer=tokenizer,
        threads=args.threads,
        max_length=args.max_length,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        max_ongoing_requests=args.max_ongoing_requests,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_texts=args.max_texts,
        max_text_chars=args.max_text_chars,
        max_body_bytes=args.max_body_bytes,
    )
    name = args.name or APP_NAME
    if args.address is None:  # a new local cluster (never one found by chance), no dashboard
        # Ray starts workers at niceness +15 by default; replicas doing the serving should run
        # at this command's own priority (RAY_worker_niceness set by the caller wins).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=args.address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name=name, route_prefix="/")
        print(
            f"serving {model.name} on http://{args.host}:{args.port}/ "
            f'(POST {{"texts": [...]}}; GET /health), {args.replicas} replica(s) x '
            f"{args.threads} thread(s); Ray application '{name}'",
            flush=True,
        )
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        # On a shared cluster remove only this application; a local cluster goes entirely.
        if args.address is None:
            serve.shutdown()
        else:
            serve.delete(name)
        ray.shutdown()
    return 0
