"""`fastonnx info`: versions, the custom-op library, CPU features and the kernel each op uses."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="show versions, the custom-op library, CPU features and chosen kernels",
        description="Show fastonnx's and ONNX Runtime's versions, the custom-op library path, "
        "the CPU features detected, and which kernel path each operator will use here "
        "(FASTONNX_ISA=amx|avx512_vnni|avx2|ref forces a path, FASTONNX_KERNEL=<name> one "
        "kernel of the manifest).",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def collect() -> dict:
    import numpy as np
    import onnxruntime as ort

    from fastonnx import __version__, _native, get_library_path

    features = _native.cpu_features()
    isas = {isa: _native.isa_unavailable_reason(isa) or "available" for isa in _native.all_isas()}
    forced, forced_error = None, None
    try:
        forced = _native.forced_isa()
    except ValueError as exc:
        forced_error = str(exc)
    kernels, attention = {}, {}
    if forced_error is None:
        try:
            attention = {"any": _native.attention_kernel_name()}
        except ValueError as exc:  # FASTONNX_ISA selects an attention path this CPU lacks
            forced_error = str(exc)
    if forced_error is None:
        # The kernel a dense and a 90%-sparse weight of the preferred shape would get.
        block = tuple(_native.preferred_block_shape(forced))
        rng = np.random.default_rng(0)
        for label, density in (("dense", 1.0), ("90% sparse", 0.1)):
            w = (rng.random((256, 256)) < density).astype(np.int8)
            blob = _native.pack_weight(w, np.ones(256, np.float32), block)
            kernels[label] = _native.Linear(blob).name
    return {
        "fastonnx": __version__,
        "onnxruntime": ort.__version__,
        "library": get_library_path(),
        "cpu_vendor": features.pop("vendor"),
        "cpu_features": features,
        "kernel_paths": isas,
        "FASTONNX_ISA": os.environ.get("FASTONNX_ISA") or None,
        "FASTONNX_ISA_error": forced_error,
        # With an invalid FASTONNX_ISA no path is used: sessions fail (see FASTONNX_ISA_error).
        "best_path": None if forced_error else forced or _native.best_isa(),
        "preferred_block_shape": None
        if forced_error
        else list(_native.preferred_block_shape(forced)),
        "supported_block_shapes": [list(b) for b in _native.supported_block_shapes()],
        "kernel_manifest": _native.kernels(),
        "ops": {
            "com.fastonnx::SparseLinear": kernels,
            "com.fastonnx::SparseLinearU8": kernels,
            "com.fastonnx::Attention": attention,
            "com.fastonnx::LayerNorm": {} if forced_error else {"any": _native.layer_norm_path()},
            "com.fastonnx::PackTokens": {"any": "portable"},
            "com.fastonnx::UnpackTokens": {"any": "portable"},
            "com.fastonnx::SelectTokens": {"any": "portable"},
        },
        "attention_paths": {
            p: _native.attention_path_unavailable_reason(p) or "available"
            for p in _native.attention_paths()
        },
    }


def format_report(info: dict) -> str:
    on = [name for name, value in info["cpu_features"].items() if value]
    lines = [
        f"fastonnx      {info['fastonnx']}",
        f"onnxruntime   {info['onnxruntime']}",
        f"library       {info['library']}",
        f"cpu           {info['cpu_vendor']}: {' '.join(on) or '(no SIMD extensions used)'}",
        "kernel paths  " + ", ".join(f"{isa} ({why})" for isa, why in info["kernel_paths"].items()),
        "attention     "
        + ", ".join(f"{path} ({why})" for path, why in info["attention_paths"].items()),
        f"FASTONNX_ISA  {info['FASTONNX_ISA'] or '(unset: automatic)'}",
    ]
    accepted = ", ".join("x".join(map(str, b)) for b in info["supported_block_shapes"])
    if info["FASTONNX_ISA_error"]:
        lines.append(f"  error: {info['FASTONNX_ISA_error']}")
        lines.append("path used     none: every session with fastonnx ops fails until it is fixed")
        lines.append(f"block shape   accepted: {accepted}")
    else:
        lines.append(f"path used     {info['best_path']}")
        block = "x".join(map(str, info["preferred_block_shape"]))
        lines.append(f"block shape   {block} preferred (accepted: {accepted})")
    lines.append("kernels       (FASTONNX_KERNEL=<name> forces one)")
    for k in info["kernel_manifest"]:
        block = "x".join(map(str, k["block_shape"]))
        state = k["unavailable_reason"] or "runs here" + (", for tests" if k["emulated"] else "")
        lines.append(f"  {k['name']:<31} {block:>5}  {k['scheme']} [{state}]")
    for op, kernels in info["ops"].items():
        for label, name in kernels.items():
            lines.append(f"{op:<28} {label:<11} -> {name}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    # 2: bad input (the environment variable), as every fastonnx command.
    return 2 if info["FASTONNX_ISA_error"] else 0
