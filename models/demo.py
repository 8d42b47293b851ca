"""The end-to-end demo: teacher -> pruned + distilled students -> `fastonnx optimize` ->
accuracy table and `fastonnx bench` speed table.

Each step reuses what an earlier run left in the cache (see models/common.py); the default
recipe takes about 15 minutes on 2 cores from scratch, `--tiny` about a minute.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402


def step(label: str, argv: list[str], check: bool = True) -> None:
    print(f"\n== {label}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(argv, check=check).returncode
    note = (
        f" (exit {rc}: see above; the accuracy table below is the task-level check)" if rc else ""
    )
    print(f"== {label}: {time.perf_counter() - start:.0f} s{note}", flush=True)


def onnx_accuracy(model: Path, dev: Path, fast: bool) -> float:
    """Dev accuracy of a logits model in ORT (with fastonnx's ops when `fast`)."""
    import onnxruntime as ort

    import fastonnx

    so = fastonnx.session_options(1) if fast else ort.SessionOptions()
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    data = np.load(dev)
    names = [i.name for i in sess.get_inputs()]
    correct = 0
    for start in range(0, len(data["labels"]), 32):
        feed = {n: data[n][start : start + 32] for n in names}
        logits = sess.run(None, feed)[0]
        correct += int((logits.argmax(-1) == data["labels"][start : start + 32]).sum())
    return correct / len(data["labels"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_common_args(parser)
    parser.add_argument(
        "--sparsity", type=float, nargs="+", default=[0.8, 0.9], help="students to build"
    )
    parser.add_argument("--runs", type=int, default=20, help="timed rounds in the bench")
    common.add_target_args(parser)
    args = parser.parse_args()
    mode = ["--tiny"] if args.tiny else ["--full"] if args.full else []
    cache = ["--cache", str(args.cache)]
    run = common.run_dir(args)
    py = sys.executable
    started = time.perf_counter()

    prune = ["--target", args.target]
    if args.block_shape:
        prune += ["--block-shape", args.block_shape]
    step("teacher", [py, str(HERE / "teacher.py"), *mode, *cache])
    for s in args.sparsity:
        step(
            f"student {s:.0%}",
            [py, str(HERE / "student.py"), "--sparsity", str(s), *prune, *mode, *cache],
        )

    calibration, dev = run / "calibration.npz", run / "dev.npz"
    rows = [
        (
            "teacher, PyTorch fp32",
            common.read_json(run / "teacher" / "metrics.json")["dev_accuracy"],
        )
    ]
    rows.append(
        ("teacher, ONNX fp32 (ORT)", onnx_accuracy(run / "teacher/onnx/model.onnx", dev, False))
    )
    fast_models = {}
    for s in args.sparsity:
        folder = run / f"student-{round(s * 100)}"
        src, fast = folder / "onnx" / "model.onnx", folder / "model.fast.onnx"
        step(
            f"optimize {s:.0%}",
            [
                py,
                "-m",
                "fastonnx",
                "optimize",
                str(src),
                "-o",
                str(fast),
                "--calibration",
                str(calibration),
                "--verify",
            ],
            # --verify's per-sample cosine is strict on 2-logit outputs; report, do not stop.
            check=False,
        )
        fast_models[s] = (src, fast)
        metrics = common.read_json(folder / "metrics.json")
        block = "x".join(map(str, metrics["block_shape"]))
        rows.append((f"{s:.0%} student ({block}), PyTorch fp32", metrics["dev_accuracy"]))
        rows.append((f"{s:.0%} student, ONNX fp32 (ORT)", onnx_accuracy(src, dev, False)))
        rows.append((f"{s:.0%} student, fastonnx sparse int8", onnx_accuracy(fast, dev, True)))

    for s, (src, fast) in fast_models.items():
        step(
            f"bench {s:.0%}",
            [
                py,
                "-m",
                "fastonnx",
                "bench",
                str(src),
                "--fastonnx-model",
                str(fast),
                "--calibration",
                str(calibration),
                "--eval-data",
                str(dev),
                "--seq-len",
                "32" if args.tiny else "128",  # the tiny model has 64 positions
                "--threads",
                "1",
                "2",
                "--batch-sizes",
                "8",
                "--runs",
                str(args.runs),
                "-o",
                str(run / f"bench-{round(s * 100)}"),
            ],
        )

    teacher = rows[0][1]
    print(f"\naccuracy on the held-out dev split ({len(np.load(dev)['labels'])} sentences)")
    for label, acc in rows:
        print(f"  {label:<38} {acc:7.2%}   {100 * (acc - teacher):+6.2f} points vs teacher")
    print(f"\ndemo wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
