"""The PNG chart of `fastonnx bench MODEL.onnx` (matplotlib, Agg backend: no display needed).

Left: batch-1 latency per variant (median bars, a whisker to p90), one bar per thread count.
Right: throughput per variant at each larger batch. Each variant's label carries its parity
(worst-sample cosine against variant 1); failed or skipped variants say so in place of bars.
"""

from __future__ import annotations

from pathlib import Path

from fastonnx.bench.model import BenchResult, VariantResult
from fastonnx.bench.variants import REFERENCE_KEY


class ChartUnavailable(RuntimeError):
    pass


def _label(r: VariantResult) -> str:
    v = r.variant
    text = f"{v.spec.number} {v.spec.label}"
    if v.precision:
        text += f" [{v.precision}]"
    if r.key == REFERENCE_KEY and v.ok:
        return text + "\nreference"
    if r.parity is not None and r.parity.cosine_min is not None:
        return text + f"\ncos {r.parity.cosine_min:.5f}"
    return text


def write_chart(result: BenchResult, path: Path) -> Path:
    try:
        import matplotlib
    except ImportError as exc:
        raise ChartUnavailable(
            "matplotlib is not installed (pip install 'fastonnx[bench]')"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    results = list(reversed(result.results))  # barh draws bottom-up; keep variant 1 on top
    latency = [s for s in result.settings if s.batch == 1]
    throughput = [s for s in result.settings if s.batch > 1]
    panels = [(latency, "latency, batch 1 (ms; bar median, whisker p90)", True)]
    if throughput:
        panels.append((throughput, "throughput (sequences/s)", False))
    height = 1.0 + 0.55 * len(results) * max(1, len(latency)) ** 0.5
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), height), squeeze=False, sharey=True
    )
    for ax, (settings, title, is_latency) in zip(axes[0], panels, strict=True):
        group = 0.8 / max(1, len(settings))
        for j, s in enumerate(settings):
            ys, values, errs = [], [], []
            for i, r in enumerate(results):
                m = r.timings.get(s)
                if m is None or m.timing is None:
                    continue
                ys.append(i + 0.4 - group * (j + 0.5))  # first setting on top
                if is_latency:
                    values.append(m.timing.median_ms)
                    errs.append(max(m.timing.p90_ms - m.timing.median_ms, 0.0))
                else:
                    values.append(m.throughput)
            bars = ax.barh(
                ys,
                values,
                height=group * 0.9,
                xerr=[[0] * len(errs), errs] if is_latency else None,
                label=s.title,
                capsize=2,
            )
            fmt = "%.2f" if is_latency else "%.1f"
            ax.bar_label(bars, fmt=fmt, padding=3, fontsize=7)
        for i, r in enumerate(results):
            if not r.variant.ok or not any(
                r.timings.get(s) and r.timings[s].timing for s in settings
            ):
                status = r.variant.status if not r.variant.ok else "no timing"
                ax.text(0, i, f"  {status}", va="center", fontsize=8, color="firebrick")
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.18)
        # Below the axes, so it never hides a bar.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(settings))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(results)), [_label(r) for r in results], fontsize=8)
    env = result.environment
    fig.suptitle(
        f"{Path(result.config.model).name}, S={result.config.seq_len} | {env['cpu']}\n"
        f"onnxruntime {env['onnxruntime']}, fastonnx {env['fastonnx']}"
        + (f", openvino {env['openvino']}" if env.get("openvino") else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
