"""Recipe: random-weight DistilBERT-geometry encoders, dense and block-sparse, for speed figures.

    python models/random_distilbert.py [--sparsity 0.8 0.9] [--target auto] [--block-shape 1x4]
                                       [--cache DIR] [--tiny]

No DistilBERT weights are reachable here, and speed depends only on shapes and the sparsity
pattern, not on the values: so the real geometry (6 layers, hidden 768, 12 heads, FFN 3072)
with random weights, pruned one-shot by block magnitude. Every variant is built from the same
seed, so they differ only in their zero blocks. Outputs, under
``<cache>/<mode>/random-distilbert/``: ``dense``, ``sparse80``, ``sparse90`` folders with
``model.onnx`` (output ``last_hidden_state``) and ``info.json`` (geometry, per-layer sparsity
measured in the ONNX file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

GEOMETRY = {"n_layers": 6, "dim": 768, "n_heads": 12, "hidden_dim": 3072}
TINY_GEOMETRY = {"n_layers": 2, "dim": 64, "n_heads": 4, "hidden_dim": 128}


def build(geometry: dict[str, int], seed: int):
    """A DistilBertModel with random weights, biases included (HF initialises them to 0, and
    all-zero biases would be shared as one initializer by the exporter, unlike real models)."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    model = DistilBertModel(DistilBertConfig(**geometry)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def variant_name(sparsity: float) -> str:
    return "dense" if sparsity == 0 else f"sparse{round(sparsity * 100)}"


def make_variant(args, geometry: dict[str, int], sparsity: float, out: Path) -> None:
    from fastonnx.compress import export_pruned, prune_once
    from fastonnx.compress.pruning import format_report

    model = build(geometry, args.seed)
    pruner = prune_once(model, sparsity, block_shape=args.block_shape, target=args.target)
    with common.atomic_dir(out, force=True) as tmp:
        exported = export_pruned(model, tmp / "model.onnx", pruner, output="last_hidden_state")
        print(f"[random-distilbert] ONNX block sparsity, {exported.exporter} exporter:")
        print(format_report(x.measured for x in exported.layers))
        common.write_json(
            tmp / "info.json",
            {
                "geometry": geometry,
                "seed": args.seed,
                "sparsity": sparsity,
                "block_shape": list(pruner.block_shape),
                "target": args.target,
                "exporter": exported.exporter,
                "layers": {x.layer: x.measured.sparsity for x in exported.layers},
                "zero_blocks": {
                    x.layer: [x.measured.zero_blocks, x.measured.blocks] for x in exported.layers
                },
            },
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Random-weight DistilBERT geometry, dense and block-pruned, to ONNX.",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        nargs="+",
        default=[0.8, 0.9],
        help="block sparsities of the pruned variants (a dense one is always made)",
    )
    common.add_target_args(parser)
    common.add_common_args(parser, full=False)  # one-shot pruning: no long version
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_environment()
    from fastonnx.compress.schedule import check_sparsity

    common.resolve_target_args(args)
    sparsities = [0.0, *sorted({check_sparsity(s) for s in args.sparsity if s > 0})]
    geometry = TINY_GEOMETRY if args.tiny else GEOMETRY
    root = common.run_dir(args) / "random-distilbert"
    with common.timed("random DistilBERT recipe"):
        for sparsity in sparsities:
            out = root / variant_name(sparsity)
            info = out / "info.json"
            stale = info.exists() and (
                tuple(common.read_json(info)["block_shape"]) != tuple(args.block_shape)
            )
            if stale:
                print(f"[random-distilbert] {out} has another block shape: redoing it")
            if common.needed(out / "model.onnx", args.force or stale):
                with common.timed(f"{variant_name(sparsity)}: prune + export"):
                    make_variant(args, geometry, sparsity, out)
            print(f"[random-distilbert] {out / 'model.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
