"""Length-adaptive inference on the demo task: dev accuracy and speed of token-dropping
configurations against full length.

    python models/length_adaptive.py [--tiny | --full] [--sparsity 0.8] [--runs 5]

For the student of ``--sparsity`` (built by models/student.py; optimized here with the
sparse-int8 preset when its ``model.fast.onnx`` is missing), each length configuration (the
share of its tokens each layer but the last hands to the next, see
fastonnx/passes/drop_tokens.py) is applied to the optimized model and run over the dev split in
batches of 32 on 1 thread: dev accuracy, and the median time of ``--runs`` interleaved passes
over the whole split after one warm-up pass. Prints the curve and which configurations stay
within 1 point of full length; writes it to ``<student>/length_curve.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

BATCH = 32


def configurations(layers: int) -> dict[str, list[float]]:
    """Uniform shares after every layer, and the same starting after the second layer."""
    out = {"full length": [1.0] * (layers - 1)}
    for share in (0.9, 0.8, 0.7, 0.6, 0.5):
        out[f"{share:g} after every layer"] = [share] * (layers - 1)
        if layers > 3:
            out[f"{share:g} from layer 2"] = [1.0, 1.0] + [share] * (layers - 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument("--sparsity", type=float, default=0.8, help="the student to measure")
    parser.add_argument("--runs", type=int, default=5, help="timed passes over the dev split")
    args = parser.parse_args(argv)
    common.setup_environment()

    import onnx_ir as ir

    import fastonnx
    from fastonnx.bench.model import time_rounds
    from fastonnx.bench.timing import cpu_model
    from fastonnx.passes.drop_tokens import drop_tokens

    run = common.run_dir(args)
    student = run / f"student-{round(args.sparsity * 100)}"
    fast = student / "model.fast.onnx"
    if not (student / "onnx" / "model.onnx").exists():
        print(f"no student at {student}: run models/student.py first", file=sys.stderr)
        return 2
    if not fast.exists():
        argv = [sys.executable, "-m", "fastonnx", "optimize", str(student / "onnx" / "model.onnx")]
        argv += ["-o", str(fast), "--calibration", str(run / "calibration.npz")]
        subprocess.run(argv, check=True)
    dev = np.load(run / "dev.npz")
    labels = dev["labels"]
    base = ir.load(fast)
    layers = sum(1 for n in base.graph if n.op_type == "Attention")
    names = None
    sessions, accuracy = {}, {}
    for label, shares in configurations(layers).items():
        model = ir.load(fast)
        report = drop_tokens(model, shares)
        if shares != [1.0] * (layers - 1) and not report.changed:
            print(f"{label}: not applied ({report.reason})", file=sys.stderr)
            return 2
        proto = ir.serde.serialize_model(model).SerializeToString()
        session = fastonnx.make_session(proto, 1)
        names = names or [i.name for i in session.get_inputs()]
        batches = [{n: dev[n][i : i + BATCH] for n in names} for i in range(0, len(labels), BATCH)]
        predictions = np.concatenate([session.run(None, b)[0].argmax(-1) for b in batches])
        accuracy[label] = float((predictions == labels).mean())
        sessions[label] = (session, batches)

    def pass_over(session, batches):
        return lambda: [session.run(None, b) for b in batches]

    timings, errors = time_rounds(
        {label: pass_over(*sb) for label, sb in sessions.items()}, warmup=1, runs=args.runs
    )
    if errors:
        print(errors, file=sys.stderr)
        return 1
    full = "full length"
    print(
        f"\n{student.name} ({run.name} mode), {len(labels)} dev sentences in batches of {BATCH}, "
        f"1 thread, {cpu_model()}; median of {args.runs} interleaved passes after 1 warm-up"
    )
    print(f"{'configuration':<26} {'accuracy':>9} {'vs full':>8} {'pass s':>8} {'speed-up':>9}")
    curve = []
    for label in sessions:
        t = timings[label]
        speedup = timings[full].median_ms / t.median_ms
        delta = 100 * (accuracy[label] - accuracy[full])
        print(
            f"{label:<26} {accuracy[label]:>8.2%} {delta:>+7.2f} {t.median_ms / 1e3:>8.3f} "
            f"{speedup:>8.2f}x"
        )
        curve.append(
            {
                "configuration": label,
                "shares": configurations(layers)[label],
                "accuracy": accuracy[label],
                "points_vs_full": delta,
                "pass_ms": {"median": t.median_ms, "p90": t.p90_ms, "runs": t.runs},
                "speedup": speedup,
            }
        )
    within = [c for c in curve if c["points_vs_full"] >= -1.0 and c["configuration"] != full]
    best = max(within, key=lambda c: c["speedup"], default=None)
    if best:
        print(
            f"fastest within 1 point of full length: {best['configuration']} "
            f"({best['speedup']:.2f}x, {best['points_vs_full']:+.2f} points)"
        )
    else:
        print("no configuration stays within 1 point of full length")
    common.write_json(student / "length_curve.json", {"cpu": cpu_model(), "curve": curve})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
