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

``--search``: a greedy search on the first half of the dev split. From full length, each round
lowers by 0.1 the one layer's share that saves the most work (tokens summed over layers) while
the accuracy on that half stays within ``--budget`` points of full length; it stops when no step
does. The configuration found joins the curve, whose accuracy is also given on the second half
(not used by the search).

``--length-drop STEPS``: first fine-tune the model with LengthDrop for STEPS steps
(fastonnx.compress.length_drop: each step trains the full-length model on the labels and the
original model's soft targets, and the smallest and two random token-dropping sub-models on the
full-length model's logits; ``--max-drop`` bounds what a layer drops), zeros of a sparse student
kept; the curve is then measured on the result, ``<model>-lengthdrop``.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _session(fast: Path, shares: list[float]):
    import onnx_ir as ir

    import fastonnx
    from fastonnx.passes.drop_tokens import drop_tokens

    model = ir.load(fast)
    report = drop_tokens(model, shares)
    if any(x < 1.0 for x in shares) and not report.changed:
        raise SystemExit(f"token dropping not applied: {report.reason}")
    return fastonnx.make_session(ir.serde.serialize_model(model).SerializeToString(), 1)


def _batches(dev: Any, names: list[str], rows: slice) -> list[dict[str, np.ndarray]]:
    n = len(dev["labels"][rows])
    start = rows.start or 0
    chunks = range(start, start + n, BATCH)
    return [{k: dev[k][i : min(i + BATCH, start + n)] for k in names} for i in chunks]


def _accuracy(session: Any, dev: Any, rows: slice) -> float:
    names = [i.name for i in session.get_inputs()]
    predictions = np.concatenate(
        [session.run(None, b)[0].argmax(-1) for b in _batches(dev, names, rows)]
    )
    return float((predictions == dev["labels"][rows]).mean())


def work(shares: list[float]) -> float:
    """Tokens summed over layers, relative to full length (what the linear layers scale with)."""
    kept, total = 1.0, 1.0
    for share in shares:
        kept *= share
        total += kept
    return total / (len(shares) + 1)


def search(fast: Path, dev: Any, rows: slice, budget: float) -> list[float]:
    """The greedy search of the module doc."""
    layers = _layers(fast)
    shares = [1.0] * (layers - 1)
    full = _accuracy(_session(fast, shares), dev, rows)
    while True:
        best = None
        for layer in range(layers - 1):
            if shares[layer] < 0.45:  # 0.4 is the lowest share tried
                continue
            candidate = list(shares)
            candidate[layer] = round(candidate[layer] - 0.1, 2)
            acc = _accuracy(_session(fast, candidate), dev, rows)
            if 100 * (full - acc) <= budget and (best is None or work(candidate) < work(best)):
                best = candidate
        if best is None:
            return shares
        shares = best
        print(f"[search] {shares}: work {work(shares):.2f} of full length", flush=True)


def keep_zeros(model: Any, optimizer: Any) -> int:
    """Hold a sparse model's zero weights at zero through fine-tuning (a post-step hook on
    ``optimizer``); returns how many weight matrices have zeros."""
    import torch

    masks = [
        (m.weight, m.weight != 0)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and bool((m.weight == 0).any())
    ]

    def reapply(*_args: Any) -> None:
        with torch.no_grad():
            for weight, mask in masks:
                weight.mul_(mask)

    optimizer.register_step_post_hook(reapply)
    return len(masks)


def length_train(args: argparse.Namespace, folder: Path, steps: int) -> Path:
    """``folder``'s model fine-tuned with LengthDrop (the module doc's ``--length-drop``), in
    ``<folder>-lengthdrop``: model/, onnx/model.onnx, metrics.json. Reused when present."""
    import student as student_recipe
    import teacher as teacher_recipe

    out = folder.parent / f"{folder.name}-lengthdrop"
    onnx_path = out / "onnx" / "model.onnx"
    if not common.needed(onnx_path, args.force):
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastonnx.compress import DistillConfig, export_model, train
    from fastonnx.compress.length_drop import LengthDrop

    settings = common.settings_for(args)
    split = common.load_split(teacher_recipe.paths_for(args).split)
    torch.manual_seed(args.seed)
    original = AutoModelForSequenceClassification.from_pretrained(folder / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = copy.deepcopy(original)
    texts, labels = student_recipe.distillation_text(args, settings, split)
    batches = common.batches_of(
        tokenizer,
        texts,
        labels,
        settings.batch_size,
        settings.max_len,
        seed=args.seed + 3,
        group_by_length=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.length_lr, weight_decay=0.01)
    sparse = keep_zeros(model, optimizer)
    print(f"[length-drop] {steps} steps from {folder.name} ({sparse} sparse matrices kept sparse)")
    with common.timed(f"LengthDrop fine-tune, {steps} steps"):
        result = train(
            model,
            original,
            batches,
            steps=steps,
            optimizer=optimizer,
            config=DistillConfig(temperature=settings.temperature),
            lr_scheduler=teacher_recipe.linear_warmup_decay(optimizer, steps),
            log_every=max(1, steps // 20),
            length_drop=LengthDrop(max_drop=args.max_drop, seed=args.seed),
        )
    dev = common.batches_of(tokenizer, split.dev_texts, split.dev_labels, 64, settings.max_len)
    with common.atomic_dir(out / "model", force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    common.write_json(
        out / "metrics.json",
        {
            "from": folder.name,
            "steps": steps,
            "max_drop": args.max_drop,
            "lr": args.length_lr,
            "seconds": round(result.seconds, 1),
            "dev_accuracy_full_length": common.accuracy(model, dev),
            "dev_accuracy_before": common.accuracy(original, dev),
        },
    )
    with common.atomic_dir(onnx_path.parent, force=True) as tmp:
        export_model(model, tmp / onnx_path.name)
    return out


def _layers(fast: Path) -> int:
    import onnx

    model = onnx.load(fast, load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type == "Attention")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    common.add_common_args(parser)
    parser.add_argument("--sparsity", type=float, default=0.8, help="the student to measure")
    parser.add_argument("--teacher", action="store_true", help="measure the dense teacher instead")
    parser.add_argument("--runs", type=int, default=5, help="timed passes over the dev split")
    parser.add_argument("--search", action="store_true", help="search a configuration (above)")
    parser.add_argument("--budget", type=float, default=1.0, help="search: points of accuracy")
    parser.add_argument(
        "--length-drop",
        type=int,
        default=0,
        metavar="STEPS",
        help="fine-tune with LengthDrop for STEPS steps first (above)",
    )
    parser.add_argument(
        "--max-drop", type=float, default=0.3, help="LengthDrop: most a layer drops (0.3)"
    )
    parser.add_argument("--length-lr", type=float, default=2e-5, help="LengthDrop: peak LR")
    args = parser.parse_args(argv)
    common.setup_environment()

    from fastonnx.bench.model import time_rounds
    from fastonnx.bench.timing import cpu_model

    run = common.run_dir(args)
    folder = run / ("teacher" if args.teacher else f"student-{round(args.sparsity * 100)}")
    if not (folder / "onnx" / "model.onnx").exists():
        print(f"no model at {folder}: run models/teacher.py / student.py first", file=sys.stderr)
        return 2
    if args.length_drop:
        folder = length_train(args, folder, args.length_drop)
    fast = folder / "model.fast.onnx"
    if not fast.exists():
        argv = [sys.executable, "-m", "fastonnx", "optimize", str(folder / "onnx" / "model.onnx")]
        argv += ["-o", str(fast), "--calibration", str(run / "calibration.npz")]
        subprocess.run(argv, check=True)
    dev = np.load(run / "dev.npz")
    labels = dev["labels"]
    half = len(labels) // 2
    first, second, everything = slice(0, half), slice(half, len(labels)), slice(0, len(labels))
    configs = configurations(_layers(fast))
    if args.search:
        found = search(fast, dev, first, args.budget)
        configs[f"searched ({args.budget:g} pt)"] = found
    sessions, accuracy, held_out = {}, {}, {}
    for label, shares in configs.items():
        session = _session(fast, shares)
        names = [i.name for i in session.get_inputs()]
        sessions[label] = (session, _batches(dev, names, everything))
        accuracy[label] = _accuracy(session, dev, everything)
        held_out[label] = _accuracy(session, dev, second)

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
        f"\n{folder.name} ({run.name} mode), {len(labels)} dev sentences in batches of {BATCH}, "
        f"1 thread, {cpu_model()}; median of {args.runs} interleaved passes after 1 warm-up; "
        f"'2nd half': the {len(labels) - half} dev sentences the search did not see"
    )
    print(
        f"{'configuration':<24} {'accuracy':>9} {'vs full':>8} {'2nd half':>9} {'work':>5} "
        f"{'pass s':>7} {'speed-up':>9}"
    )
    curve = []
    for label, shares in configs.items():
        t = timings[label]
        speedup = timings[full].median_ms / t.median_ms
        delta = 100 * (accuracy[label] - accuracy[full])
        held = 100 * (held_out[label] - held_out[full])
        print(
            f"{label:<24} {accuracy[label]:>8.2%} {delta:>+7.2f} {held:>+8.2f} "
            f"{work(shares):>5.2f} {t.median_ms / 1e3:>7.3f} {speedup:>8.2f}x"
        )
        curve.append(
            {
                "configuration": label,
                "shares": shares,
                "accuracy": accuracy[label],
                "points_vs_full": delta,
                "second_half_points_vs_full": held,
                "work": work(shares),
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
    common.write_json(folder / "length_curve.json", {"cpu": cpu_model(), "curve": curve})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
