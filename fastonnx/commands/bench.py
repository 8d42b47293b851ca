"""`fastonnx bench`: two benchmarks behind one command.

* ``fastonnx bench kernels [options]`` — kernel speed against ORT's MatMul and
  DynamicQuantizeMatMul (:mod:`fastonnx.bench.kernels`);
* ``fastonnx bench MODEL.onnx [options]`` — a whole encoder against vanilla ORT, ORT's own
  optimizer and int8 quantizer, and OpenVINO when installed (:mod:`fastonnx.bench.model`).

The ``bench`` sub-command takes the target and hands the rest of the command line to that
target's own parser, so each form has its own options and ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_BENCH_EPILOG = """\
forms:
  fastonnx bench kernels [options]       sparse INT8 linear op vs ORT's MatMul and
                                         DynamicQuantizeMatMul, one layer at a time
  fastonnx bench MODEL.onnx [options]    the exported encoder vs vanilla ORT, ORT's optimizer,
                                         ORT dynamic int8, fastonnx int8/sparse-int8, OpenVINO

options come after the target; see `fastonnx bench kernels --help` and
`fastonnx bench MODEL.onnx --help`.
"""

_MODEL_EPILOG = """\
variants (--variants selects some; all by default):
  1  ort-fp32      ORT, the model as exported
  2  ort-opt       ORT after onnxruntime.transformers optimize_model (model_type bert)
  3  ort-int8      ORT quantize_dynamic applied to variant 2's model
  4  fastonnx-qdq  fastonnx preset int8 (QDQ), in vanilla ORT without fastonnx's library
  5  fastonnx      fastonnx preset sparse-int8, with fastonnx's custom-op library (packed
                   execution where it applies: only the valid tokens are computed)
  5p fastonnx-padded  the same with --no-packing (every padded position computed); not run
                   unless named in --variants (or with --texts)
  6a openvino      OpenVINO on the exported model (its CPU default precision; bf16 on CPUs
                   with AMX / AVX512-BF16, read back from the compiled model)
  6b openvino-qdq  OpenVINO on variant 4's QDQ model
  A variant that cannot be built or run is reported in its row with the error; OpenVINO
  variants are skipped with a note when openvino is not installed.

measurement:
  Batch-1 latency on each --threads count, throughput at each --batch-sizes on the most
  threads. Within one setting every variant's session is opened first, then the variants
  run interleaved round by round (A B C A B C ...) after --warmup rounds, on identical
  synthesized token inputs (--seed). ORT's worker threads spin during each run, as in a
  default ORT deployment, and are stopped when it returns (session.force_spinning_stop), so
  no idle session steals cores from the one timed next. --no-spin makes them sleep between
  operators instead: every parallel section then pays a thread wake-up (about 16 us, and far
  more on some VMs), which is what a deployment with allow_spinning=0 sees.
  Parity: cosine (worst sample) and max abs diff of the first output against variant 1,
  on --parity-samples fresh inputs (every other one padded); token outputs [B, S, ...] are
  compared at the valid positions (attention_mask 1) only.

real sentences (--texts FILE --tokenizer DIR):
  --text-batches random batches of the largest --batch-sizes sentences (default 32) from FILE
  (one per line, or the last column of a .csv), each padded to its longest (at most
  --seq-len tokens), timed on the most --threads: one round runs every batch once, variants
  interleaved round by round. Default variants: fastonnx (packed), fastonnx-padded, ort-int8,
  openvino-qdq. Reports sequences/s, tokens/s (valid tokens), the ratios to padded fastonnx
  and to OpenVINO int8, and each output's cosine to padded fastonnx at the valid positions.
  Writes bench-texts.json under --out-dir; calibrates on the file's first --num-samples.

accuracy (--eval-data FILE.npz):
  one array per model input (axis 0 = rows) plus `labels` (integer class ids); the first
  model output must be logits [rows, classes]; accuracy = mean(argmax == labels).

calibration (variants 4 and 5): --calibration FILE.npz (one array per model input), or
  --num-samples synthesized token inputs of length --seq-len (said in the notes).

writes, under --out-dir: bench.json (fields documented in fastonnx/bench/report.py),
  bench.png, models/ (the variants' model files), profile/ (ORT traces, with --profile).

exit status: 0 done (failed variants are in the table), 1 no variant could be timed,
  2 bad input or options.

example:
  fastonnx bench model.onnx --threads 1 2 --batch-sizes 8 --profile -o bench-out
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark fastonnx against ONNX Runtime (kernels, or a whole model)",
        description="Benchmarks that print figures, side by side against ONNX Runtime.",
        epilog=_BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="kernels|MODEL.onnx", help="what to benchmark")
    p.add_argument(
        "options", nargs=argparse.REMAINDER, help="that benchmark's options (see its --help)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.target == "kernels":
        return run_kernels(kernels_parser().parse_args(args.options))
    return run_model(model_parser().parse_args([args.target, *args.options]))


# --------------------------------------------------------------------------------------------
# fastonnx bench kernels


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


def kernels_parser() -> argparse.ArgumentParser:
    from fastonnx.bench.kernels import DEFAULT_ATTENTION_SEQ, DEFAULT_SPARSITIES, SHAPES

    p = argparse.ArgumentParser(
        prog="fastonnx bench kernels",
        description="Times the sparse INT8 linear op against ORT's fp32 MatMul and int8 "
        "DynamicQuantizeMatMul (com.microsoft) on the linear-layer shapes of MiniLM-L6 and "
        "DistilBERT, each as a one-node ORT session, interleaved round by round after a "
        "warm-up; it prints median and p90 per call and the speed-up ratios. Then fastonnx's "
        "Attention op against ORT's MultiHeadAttention on the models' head shapes.",
    )
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
    p.add_argument(
        "--attention-seq",
        nargs="*",
        type=int,
        default=list(DEFAULT_ATTENTION_SEQ),
        metavar="S",
        help="sequence lengths of the attention rows (default: %(default)s; none: no rows)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per variant (10)")
    p.add_argument("--runs", type=int, default=50, help="timed calls per variant (50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kernels",
        nargs="+",
        metavar="NAME",
        help="time these manifest kernels side by side (`all`: every one this CPU runs; "
        "default: the one the op chooses); `fastonnx info` lists them",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def run_kernels(args: argparse.Namespace) -> int:
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

    names = args.kernels
    if names == ["all"]:
        names = kernels.runnable_kernels()
    elif names:
        unknown = sorted(set(names) - set(kernels.runnable_kernels()))
        if unknown:
            print(
                f"fastonnx bench kernels: cannot run {', '.join(unknown)} here "
                f"(runnable: {', '.join(kernels.runnable_kernels())})",
                file=sys.stderr,
            )
            return 2
    rows = kernels.run(
        models=args.models,
        kernels=names,
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
    attention = []
    if args.attention_seq:
        attention = kernels.run_attention(
            models=args.models,
            seqs=args.attention_seq,
            threads=args.threads,
            warmup=args.warmup,
            runs=args.runs,
            seed=args.seed,
        )
        print(kernels.format_attention_table(attention))
    if args.json:
        kernels.write_json(args.json, rows, env, attention)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------
# fastonnx bench MODEL.onnx


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def model_parser() -> argparse.ArgumentParser:
    from fastonnx.bench.variants import SPECS

    p = argparse.ArgumentParser(
        prog="fastonnx bench",
        usage="fastonnx bench MODEL.onnx [options]",
        description="Compare an exported encoder on ORT (as exported, after ORT's optimizer, "
        "ORT dynamic int8), fastonnx (int8 QDQ in vanilla ORT, sparse-int8 with fastonnx's "
        "kernels) and OpenVINO when installed: latency, throughput, output parity, and "
        "optionally accuracy and a per-operator profile; as a table, JSON and a PNG chart.",
        epilog=_MODEL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx", help="the encoder as exported")
    p.add_argument(
        "-o",
        "--out-dir",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="where results go (default: %(default)s)",
    )
    shape = p.add_argument_group("what to time")
    shape.add_argument(
        "--seq-len", metavar="N", type=_positive, default=128, help="sequence length (128)"
    )
    shape.add_argument(
        "--threads",
        metavar="N",
        type=_positive,
        nargs="+",
        default=[1, 2],
        help="intra-op thread counts for batch-1 latency (default: 1 2)",
    )
    shape.add_argument(
        "--batch-sizes",
        metavar="N",
        type=_positive,
        nargs="*",
        default=[8],
        help="throughput batch sizes, timed on the most threads (default: 8; none to skip)",
    )
    shape.add_argument("--warmup", metavar="N", type=_count, default=5, help="warm-up rounds (5)")
    shape.add_argument("--runs", metavar="N", type=_positive, default=30, help="timed rounds (30)")
    shape.add_argument(
        "--seed", metavar="N", type=int, default=0, help="seed of the synthesized inputs (0)"
    )
    shape.add_argument(
        "--variants",
        nargs="+",
        choices=[s.key for s in SPECS],
        metavar="KEY",
        default=None,
        help="variants to run (default: all but fastonnx-padded; with --texts: fastonnx, "
        "fastonnx-padded, ort-int8, openvino-qdq; keys below)",
    )
    texts = p.add_argument_group("real sentences")
    texts.add_argument(
        "--texts", type=Path, metavar="FILE", help="time on these sentences (see below)"
    )
    texts.add_argument(
        "--tokenizer", type=Path, metavar="DIR", help="the model's tokenizer folder (--texts)"
    )
    texts.add_argument(
        "--text-batches",
        metavar="N",
        type=_positive,
        default=8,
        help="random batches per round with --texts (8)",
    )
    shape.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ORT workers spin during each run and stop when it returns (default); "
        "--no-spin: they sleep between operators",
    )
    models = p.add_argument_group("fastonnx variants")
    models.add_argument(
        "--calibration", type=Path, metavar="FILE.npz", help="int8 calibration inputs"
    )
    models.add_argument(
        "--num-samples", metavar="N", type=_positive, default=16, help="calibration samples (16)"
    )
    models.add_argument(
        "--fastonnx-model",
        type=Path,
        metavar="FILE",
        help="an already optimized sparse-int8 model (variant 5): skip optimizing",
    )
    models.add_argument(
        "--fastonnx-padded-model",
        type=Path,
        metavar="FILE",
        help="an already optimized sparse-int8 --no-packing model (variant 5p): skip optimizing",
    )
    models.add_argument(
        "--qdq-model",
        type=Path,
        metavar="FILE",
        help="an already optimized int8 QDQ model (variants 4 and 6b): skip optimizing",
    )
    checks = p.add_argument_group("checks and reports")
    checks.add_argument(
        "--parity-samples",
        metavar="N",
        type=_positive,
        default=4,
        help="inputs compared with variant 1 (4)",
    )
    checks.add_argument(
        "--eval-data", type=Path, metavar="FILE.npz", help="inputs + labels: report accuracy"
    )
    checks.add_argument(
        "--profile",
        action="store_true",
        help="per-operator time (ORT profiler) of variant 5 and ORT's faster int8 variant",
    )
    checks.add_argument("--no-chart", action="store_true", help="do not draw bench.png")
    checks.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def run_model(args: argparse.Namespace) -> int:
    if (args.texts is None) != (args.tokenizer is None):
        print("fastonnx bench: error: --texts and --tokenizer go together", file=sys.stderr)
        return 2
    if args.variants is None:
        from fastonnx.bench.texts import TEXT_VARIANTS
        from fastonnx.bench.variants import DEFAULT_KEYS

        args.variants = list(TEXT_VARIANTS if args.texts else DEFAULT_KEYS)
    return run_texts(args) if args.texts is not None else run_synthetic(args)


def _config(args: argparse.Namespace):
    """The BenchConfig of the command line (repeated values given once)."""
    from fastonnx.bench.model import BenchConfig

    return BenchConfig(
        model=args.model,
        out_dir=args.out_dir,
        seq_len=args.seq_len,
        threads=tuple(dict.fromkeys(args.threads)),
        batch_sizes=tuple(dict.fromkeys(args.batch_sizes)),
        warmup=args.warmup,
        runs=args.runs,
        seed=args.seed,
        variants=tuple(dict.fromkeys(args.variants)),
        calibration=args.calibration,
        num_samples=args.num_samples,
        parity_samples=args.parity_samples,
        fastonnx_model=args.fastonnx_model,
        qdq_model=args.qdq_model,
        padded_model=args.fastonnx_padded_model,
        eval_data=args.eval_data,
        profile=args.profile,
        spin=args.spin,
        chart=not args.no_chart,
    )


def run_texts(args: argparse.Namespace) -> int:
    from fastonnx.bench.model import Progress
    from fastonnx.bench.texts import format_text_result, run_text_bench, write_text_json
    from fastonnx.model_io import InputError

    config = _config(args)
    config.batch_sizes = config.batch_sizes or (32,)
    try:
        result = run_text_bench(
            config,
            args.texts,
            args.tokenizer,
            Progress(enabled=not args.quiet),
            batches=args.text_batches,
        )
    except InputError as exc:
        print(f"fastonnx bench: error: {exc}", file=sys.stderr)
        return 2
    print(format_text_result(result))
    path = write_text_json(result, config.out_dir / "bench-texts.json")
    print(f"\nwrote {path}")
    return 0 if any(r.timing for r in result.rows) else 1


def run_synthetic(args: argparse.Namespace) -> int:
    from fastonnx.bench.chart import ChartUnavailable, write_chart
    from fastonnx.bench.model import Progress, run_model_bench
    from fastonnx.bench.report import format_header, format_profiles, format_table, write_json
    from fastonnx.model_io import InputError

    config = _config(args)
    progress = Progress(enabled=not args.quiet)
    try:
        result = run_model_bench(config, progress)
    except InputError as exc:
        print(f"fastonnx bench: error: {exc}", file=sys.stderr)
        return 2
    if config.chart:
        try:
            result.chart_path = write_chart(result, config.out_dir / "bench.png")
        except ChartUnavailable as exc:
            result.notes.append(f"no chart: {exc}")
    result.json_path = write_json(result, config.out_dir / "bench.json")

    print(format_header(result))
    print(format_table(result))
    if result.profiles:
        print()
        print(format_profiles(result))
    written = [result.json_path] + ([result.chart_path] if result.chart_path else [])
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    timed = any(m.timing for r in result.results for m in r.timings.values())
    return 0 if timed else 1
