"""``fastonnx optimize``: rewrite an encoder ONNX model into a faster one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_EPILOG = """\
presets:
  fuse         clean-up + fusions (attention, LayerNorm, SkipLayerNorm, Gelu); float
  int8         fuse + static INT8 quantization (QDQ form; runs in vanilla ONNX Runtime)
  sparse-int8  int8 + sparse INT8 kernels for weights with enough zero blocks
               (the output needs fastonnx's custom-op library to run); packed execution
               (only the valid tokens are computed; outputs 0 at padding) where it applies

calibration (int8 presets), best first:
  --calibration FILE.npz               one array per model input name, axis 0 = samples
  --calibration-text FILE --tokenizer DIR
                                       one sentence per line, a local tokenizer folder
  (neither)                            random valid token inputs (a warning is printed)

exit status: 0 done, 1 --verify found outputs beyond tolerance, 2 bad input or options,
             3 internal error (a bug in fastonnx: a traceback is printed).

example:
  fastonnx optimize model.onnx -o model.fast.onnx --preset int8 --verify
"""


def _min_sparsity(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1] or 'auto', got {text!r}"
        ) from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fastonnx.optimizer import DEFAULT_PRESET, PRESETS

    parser = subparsers.add_parser(
        "optimize",
        help="optimize an encoder ONNX model (fusions, INT8, sparse INT8)",
        description="Rewrite a transformer encoder exported to ONNX so it runs fast on CPUs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, metavar="IN.onnx", help="model to optimize")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT.onnx",
        help="where to write the result (default: IN.fast.onnx beside the input)",
    )
    parser.add_argument(
        "--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help="default: %(default)s"
    )
    data = parser.add_argument_group("calibration")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--calibration", type=Path, metavar="FILE.npz", help="input arrays")
    source.add_argument(
        "--calibration-text", type=Path, metavar="FILE", help="sentences, one per line"
    )
    data.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="the model's Hugging Face tokenizer folder, for --calibration-text and --trim-vocab",
    )
    parser.add_argument(
        "--trim-vocab",
        type=Path,
        metavar="CORPUS",
        help="keep only the word embeddings the sentences of CORPUS (one per line) use, plus the "
        "special tokens; other ids map to the unknown token. The inputs stay the tokenizer's "
        "ids (an id-remapping Gather goes in front of the lookup). Needs --tokenizer",
    )
    data.add_argument(
        "--num-samples", type=int, metavar="N", help="samples to use (default: 16 or all)"
    )
    data.add_argument(
        "--calibration-method",
        choices=["minmax", "percentile"],
        default="minmax",
        help="activation ranges: observed min/max, or clipped at the 99.999th percentile",
    )
    parser.add_argument(
        "--min-sparsity",
        type=_min_sparsity,
        default=None,
        metavar="X",
        help="sparse-int8: lower a layer to fastonnx's kernels when at least this fraction of "
        "its 1x4 weight groups is zero (default: auto = 0 on CPUs with AVX-512 VNNI or AMX, "
        "whose kernels match ORT's int8 on dense layers with more accurate per-row "
        "activations; 0.5 elsewhere)",
    )
    parser.add_argument(
        "--static-activations",
        action="store_true",
        help="sparse-int8: lowered layers use the calibrated per-tensor input scale (the QDQ "
        "model's exact quantization) instead of quantizing each row at run time (the default: "
        "more accurate on real models with activation outliers)",
    )
    parser.add_argument(
        "--no-packing",
        action="store_true",
        help="sparse-int8: keep padded execution (by default the encoder runs on the valid "
        "tokens only where the model allows it, and token outputs are exactly 0 at padded "
        "positions)",
    )
    parser.add_argument(
        "--length-config",
        metavar="SHARES",
        type=_shares,
        default=None,
        help="sparse-int8, packed models: length-adaptive inference. Comma-separated shares of "
        "its tokens each layer but the last hands to the next (e.g. 1,0.8,0.8,0.8,0.8 for 6 "
        "layers; one value applies to every such layer); the others are dropped by the "
        "attention they received, the first token always kept, and restored at the output from "
        "the layer that dropped them. Costs accuracy on a model without length training: "
        "measure it first (models/length_adaptive.py). Default: full length",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare outputs with the input model; exit 1 when beyond the preset's tolerance",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="list every layer")
    parser.set_defaults(func=run)
    return parser


def _shares(text: str) -> list[float]:
    """--length-config: comma-separated shares in (0, 1]."""
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        message = f"expected numbers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    bad = [s for s in shares if not 0.0 < s <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"each share must be in (0, 1], got {bad[0]:g}")
    return shares


def _fail(message: str) -> int:
    print(f"fastonnx optimize: error: {message}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> str | None:
    if args.num_samples is not None and args.num_samples < 1:
        return f"--num-samples must be >= 1, got {args.num_samples}"
    if args.min_sparsity is not None and not 0.0 <= args.min_sparsity <= 1.0:
        return f"--min-sparsity must be between 0 and 1, got {args.min_sparsity}"
    if args.tokenizer is not None and args.calibration_text is None and args.trim_vocab is None:
        return "--tokenizer is only used with --calibration-text or --trim-vocab"
    if args.trim_vocab is not None and args.tokenizer is None:
        return "--trim-vocab needs --tokenizer DIR (the model's tokenizer)"
    if args.calibration_text is not None and args.tokenizer is None:
        return "--calibration-text needs --tokenizer DIR"
    return None


def run(args: argparse.Namespace) -> int:
    from fastonnx import calibration as calib
    from fastonnx.model_io import InputError, external_data_files, load_model
    from fastonnx.optimizer import optimize, require_passes
    from fastonnx.passes.quantize_qdq import CalibrationRunError, QuantizeConfig
    from fastonnx.passes.trim_vocab import TrimVocabError, trim_for_corpus
    from fastonnx.report import format_report, human_bytes
    from fastonnx.verify import format_verify, verify_files

    problem = _check_args(args)
    if problem:
        return _fail(problem)
    src: Path = args.input
    dst: Path = args.output or src.with_name(src.stem + ".fast.onnx")
    if dst.resolve() == src.resolve():
        return _fail(f"the output {dst} is the input model; choose another path with -o")

    try:
        require_passes(args.preset)  # before any work: a missing pass fails at once
        model = load_model(src)  # checks the file, so the data files below can be listed
        protect = [src, *external_data_files(src)]
        if args.trim_vocab is not None:
            trimmed = trim_for_corpus(
                model, calib.load_tokenizer(args.tokenizer), calib.read_lines(args.trim_vocab)
            )
            print(trimmed.format())
        data = verify_samples = None
        # A trimmed model is compared on its own domain: random ids would mostly be dropped ones.
        text = args.calibration_text
        if text is None and args.calibration is None and args.trim_vocab is not None:
            text = args.trim_vocab
        if args.preset != "fuse" or args.verify:
            data = calib.load_calibration(
                model,
                npz=args.calibration,
                text=text,
                tokenizer=args.tokenizer if text is not None else None,
                num_samples=args.num_samples,
                warn=args.preset != "fuse",
            )
            verify_samples = data.samples
            if data.synthetic:
                # Fresh random inputs, so verification does not reuse the calibration samples.
                fresh = calib.synthesize(model, num_samples=4, seed=1, warn=False)
                verify_samples = fresh.samples
        result = optimize(
            model,
            preset=args.preset,
            calibration=data,
            quantize_config=QuantizeConfig(method=args.calibration_method),
            min_sparsity=args.min_sparsity,
            dynamic_activations=not args.static_activations,
            packing=not args.no_packing,
            length_config=args.length_config,
        )
        print(f"{src} -> {dst}")
        print(format_report(result.report, verbose=args.verbose))
        result.save(dst, protect=protect)
        print(f"wrote {dst} ({human_bytes(dst.stat().st_size)})")

        if not args.verify:
            return 0
        verdict = verify_files(src, dst, verify_samples, args.preset)
        print(format_verify(verdict))
        return 0 if verdict.passed else 1
    except (InputError, CalibrationRunError, TrimVocabError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # permissions, full disk...
        return _fail(f"{exc.strerror or exc}: {exc.filename or dst}")
