"""`fastonnx bench kernels`: kernel speed against ORT's own MatMul and DynamicQuantizeMatMul."""

from __future__ import annotations

import argparse
import sys


def _block(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block shape must look like 1x4, got {text!r}") from None
    return rows, cols


def _sparsity(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1], got {value}")
    return value


def add_parser(subparsers) -> None:
    from fastonnx.bench.kernels import DEFAULT_SPARSITIES, SHAPES

    p = subparsers.add_parser(
        "bench",
        help="benchmark fastonnx against ONNX Runtime",
        description="Benchmarks that print figures. `fastonnx bench kernels` times the sparse "
        "INT8 linear op against ORT's fp32 MatMul and int8 DynamicQuantizeMatMul "
        "(com.microsoft) on the linear-layer shapes of MiniLM-L6 and DistilBERT, each as a "
        "one-node ORT session, interleaved round by round after a warm-up; it prints median "
        "and p90 per call and the speed-up ratios.",
    )
    p.add_argument("target", choices=["kernels"], help="what to benchmark")
    p.add_argument(
        "--models",
        nargs="+",
        choices=sorted(SHAPES),
        default=sorted(SHAPES),
        help="whose layer shapes to time (default: all)",
    )
    p.add_argument(
        "--sparsity",
        nargs="+",
        type=_sparsity,
        default=list(DEFAULT_SPARSITIES),
        help="block sparsities of the weight (default: %(default)s)",
    )
    p.add_argument("-m", "--rows", type=int, default=128, help="rows M = batch x sequence (128)")
    p.add_argument(
        "--block",
        type=_block,
        default=None,
        help="block shape RxC of the pruned weight (default: this CPU's preferred shape)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per variant (10)")
    p.add_argument("--runs", type=int, default=50, help="timed calls per variant (50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastonnx.bench import kernels

    env = kernels.environment(args.threads)
    print(
        f"# {env['cpu']} | {' '.join(env['cpu_features'])}\n"
        f"# onnxruntime {env['onnxruntime']}, fastonnx {env['fastonnx']}, "
        f"kernel path {env['kernel_path']}, {args.threads} thread(s), M={args.rows}, "
        f"{args.warmup} warm-up + {args.runs} interleaved runs, "
        f"load average {' '.join(f'{v:.2f}' for v in env['load_average'])}",
        flush=True,
    )

    def progress(done: int, total: int, row) -> None:
        print(
            f"\r[{done}/{total}] {row.model} {row.layer} {row.k}x{row.n} {row.sparsity:.0%}",
            end="" if done < total else "\n",
            file=sys.stderr,
            flush=True,
        )

    rows = kernels.run(
        models=args.models,
        sparsities=args.sparsity,
        m=args.rows,
        block=args.block,
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        seed=args.seed,
        progress=progress,
    )
    print(kernels.format_table(rows))
    if args.json:
        kernels.write_json(args.json, rows, env)
        print(f"wrote {args.json}")
    return 0
