"""`fastonnx bench kernels`: the sparse INT8 linear op against ORT's fp32 MatMul and int8
DynamicQuantizeMatMul on the same shapes, and fastonnx's Attention op against ORT's
MultiHeadAttention, each as a one-node ORT session, interleaved.

Every session runs through an IOBinding with pre-allocated input and output, so the figures are
the operators' own (a plain `run` would add a fresh NumPy output array, and its page faults, to
every call alike). The fastonnx rows are the kernel the op chooses here, or with ``kernels``
every kernel of the manifest (`_native.kernels()`) this CPU runs, forced by FASTONNX_KERNEL.

Dimensions: M rows (batch x sequence), K input features, N output features; for attention,
S sequence, N heads, H head size (batch 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from fastonnx.bench.timing import Timing, cpu_model, time_interleaved
from fastonnx.runtime import OP_DOMAIN, session_options

# (name, K, N): the linear layers of one encoder block.
SHAPES = {
    "minilm": [
        ("qkv", 384, 1152),
        ("attn_out", 384, 384),
        ("ffn1", 384, 1536),
        ("ffn2", 1536, 384),
    ],
    "distilbert": [
        ("qkv", 768, 2304),
        ("attn_out", 768, 768),
        ("ffn1", 768, 3072),
        ("ffn2", 3072, 768),
    ],
}
DEFAULT_SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
# (heads N, head size H) of each model's self-attention.
ATTENTION_SHAPES = {"minilm": (12, 32), "distilbert": (12, 64)}
DEFAULT_ATTENTION_SEQ = (128, 384)
_IR_VERSION = 10  # ORT 1.31 loads IR <= 13; onnx would otherwise write its newest


@dataclass
class KernelRow:
    model: str
    layer: str
    m: int
    k: int
    n: int
    sparsity: float
    kernel: str
    density: float  # fraction of non-zero weights
    fp32_matmul: Timing
    int8_dynamic: Timing
    fastonnx: Timing

    @property
    def gops(self) -> float:
        """Dense-equivalent GOP/s of the fastonnx op (2*M*K*N per run)."""
        return 2 * self.m * self.k * self.n / (self.fastonnx.median_ms * 1e6)

    @property
    def effective_gops(self) -> float:
        """GOP/s on the non-zero weights only (2*M*nnz per run)."""
        return self.gops * self.density

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dense_equivalent_gops"] = self.gops
        d["effective_gops"] = self.effective_gops
        d["speedup_vs_int8_dynamic"] = self.int8_dynamic.median_ms / self.fastonnx.median_ms
        d["speedup_vs_fp32_matmul"] = self.fp32_matmul.median_ms / self.fastonnx.median_ms
        return d


def block_sparse_int8(n: int, k: int, sparsity: float, block: tuple[int, int], rng) -> np.ndarray:
    """Random int8 W [N, K] with exactly round(sparsity * blocks) all-zero blocks."""
    br, bc = block
    rows, cols = -(-n // br), -(-k // bc)
    keep = np.ones(rows * cols, dtype=bool)
    keep[rng.permutation(rows * cols)[: int(round(sparsity * rows * cols))]] = False
    mask = np.kron(keep.reshape(rows, cols), np.ones(block, dtype=bool))[:n, :k]
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    w[w == 0] = 1  # kept blocks stay non-zero, so sparsity is what was asked
    return np.where(mask, w, 0).astype(np.int8)


def _model(node: onnx.NodeProto, inits: list[onnx.TensorProto], m: int, k: int, n: int, domains):
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = _IR_VERSION
    return model.SerializeToString()


def _forced_kernel_session(model: bytes, threads: int, kernel: str | None):
    """A session of the fastonnx op; `kernel` (a manifest name) is forced through FASTONNX_KERNEL,
    which the op reads when the session creates its kernels."""
    import onnxruntime as ort

    old = os.environ.get("FASTONNX_KERNEL")
    if kernel:
        os.environ["FASTONNX_KERNEL"] = kernel
    try:
        return ort.InferenceSession(
            model, session_options(threads), providers=["CPUExecutionProvider"]
        )
    finally:
        if old is None:
            os.environ.pop("FASTONNX_KERNEL", None)
        else:
            os.environ["FASTONNX_KERNEL"] = old


def bound_call(session, x: np.ndarray, n: int):
    """A no-argument callable running `session` on x with a reused output buffer."""
    y = np.empty((x.shape[0], n), dtype=np.float32)
    io = session.io_binding()
    io.bind_cpu_input("X", x)
    io.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    # The closure keeps y alive: ORT writes into its memory on every call.
    return lambda y=y: session.run_with_iobinding(io)


def build_sessions(
    w: np.ndarray,
    scale: np.ndarray,
    blob: bytes,
    m: int,
    threads: int,
    kernels: Sequence[str | None] = (None,),
):
    """[fp32 MatMul, DynamicQuantizeMatMul, fastonnx op per entry of `kernels` (None: auto)]."""
    import onnxruntime as ort

    n, k = w.shape
    w_float = (w.astype(np.float32) * scale[:, None]).T.copy()  # [K, N]
    fp32 = _model(
        helper.make_node("MatMul", ["X", "W"], ["Y"]),
        [onnx.numpy_helper.from_array(w_float, "W")],
        m,
        k,
        n,
        [],
    )
    dq = _model(
        helper.make_node(
            "DynamicQuantizeMatMul", ["X", "B", "b_scale"], ["Y"], domain="com.microsoft"
        ),
        [
            onnx.numpy_helper.from_array(w.T.copy(), "B"),
            onnx.numpy_helper.from_array(scale.astype(np.float32), "b_scale"),
        ],
        m,
        k,
        n,
        ["com.microsoft"],
    )
    sparse = _model(
        helper.make_node("SparseLinear", ["X", "Wp"], ["Y"], domain=OP_DOMAIN),
        [onnx.numpy_helper.from_array(np.frombuffer(blob, dtype=np.uint8), "Wp")],
        m,
        k,
        n,
        [OP_DOMAIN],
    )
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    return [
        ort.InferenceSession(fp32, plain, providers=providers),
        ort.InferenceSession(dq, plain, providers=providers),
        *(_forced_kernel_session(sparse, threads, kernel) for kernel in kernels),
    ]


def runnable_kernels() -> list[str]:
    """Manifest kernels this CPU runs natively (emulated ones are for tests)."""
    from fastonnx import _native

    return [
        k["name"] for k in _native.kernels() if not k["emulated"] and not k["unavailable_reason"]
    ]


def run(
    models=("minilm", "distilbert"),
    sparsities=DEFAULT_SPARSITIES,
    m: int = 128,
    block: tuple[int, int] | None = None,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    seed: int = 0,
    kernels: Sequence[str] | None = None,
    progress=None,
) -> list[KernelRow]:
    """Times each shape x sparsity; `kernels`: manifest names to time side by side (default: the
    one the op chooses; see `runnable_kernels`)."""
    from fastonnx import _native

    block = tuple(block or _native.preferred_block_shape())
    rng = np.random.default_rng(seed)
    rows = []
    jobs = [(mod, s, sp) for mod in models for s in SHAPES[mod] for sp in sparsities]
    for i, (model, (layer, k, n), sparsity) in enumerate(jobs):
        w = block_sparse_int8(n, k, sparsity, block, rng)
        scale = (rng.random(n, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
        blob = _native.pack_weight(w, scale, block)
        names = list(kernels) if kernels else [_native.Linear(blob).name]
        sessions = build_sessions(w, scale, blob, m, threads, kernels=names)
        x = rng.standard_normal((m, k), dtype=np.float32)
        fns = [bound_call(s, x, n) for s in sessions]
        fp32, int8, *mine = time_interleaved(fns, warmup=warmup, runs=runs)
        density = float(np.count_nonzero(w)) / w.size
        for name, t in zip(names, mine, strict=True):
            rows.append(KernelRow(model, layer, m, k, n, sparsity, name, density, fp32, int8, t))
        if progress:
            progress(i + 1, len(jobs), rows[-1])
    return rows


@dataclass
class AttentionRow:
    model: str
    s: int
    heads: int
    head_size: int
    kernel: str
    mha: Timing  # com.microsoft::MultiHeadAttention with a [1, 1, S, S] attention_bias
    fastonnx: Timing  # com.fastonnx::Attention with the [1, 1, 1, S] mask the optimizer feeds it
    cosine: float  # fastonnx's output against a float64 reference

    def as_dict(self) -> dict:
        d = asdict(self)
        d["speedup_vs_mha"] = self.mha.median_ms / self.fastonnx.median_ms
        return d


def attention_reference(q, k, v, heads: int) -> np.ndarray:
    """softmax(Q K^T / sqrt(H)) V in float64 for [1, S, D] inputs."""
    s, d = q.shape[1:]
    h = d // heads

    def split(x):
        return x.reshape(s, heads, h).transpose(1, 0, 2).astype(np.float64)

    scores = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(h)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(1, 0, 2).reshape(1, s, d)


def build_attention_sessions(s: int, heads: int, d: int, threads: int):
    import onnxruntime as ort

    def model(op: str, domain: str, names: list[str], mask_s: int) -> bytes:
        inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, s, d]) for x in "qkv"]
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, mask_s, s]))
        node = helper.make_node(op, names, ["y"], domain=domain, num_heads=heads)
        graph = helper.make_graph(
            [node],
            "bench",
            inputs,
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, d])],
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
        proto = helper.make_model(graph, opset_imports=opsets)
        proto.ir_version = _IR_VERSION
        return proto.SerializeToString()

    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    mha = model("MultiHeadAttention", "com.microsoft", ["q", "k", "v", "", "", "mask"], s)
    ours = model("Attention", OP_DOMAIN, ["q", "k", "v", "mask"], 1)
    return [
        ort.InferenceSession(mha, plain, providers=providers),
        ort.InferenceSession(ours, session_options(threads), providers=providers),
    ]


def _bound_attention(session, feeds: dict[str, np.ndarray]):
    """A no-argument callable running `session` with bound inputs and a reused output."""
    q = feeds["q"]
    y = np.empty(q.shape, dtype=np.float32)
    io = session.io_binding()
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    io.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    return lambda y=y: session.run_with_iobinding(io)


def run_attention(
    models=("minilm", "distilbert"),
    seqs=DEFAULT_ATTENTION_SEQ,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    seed: int = 0,
    progress=None,
) -> list[AttentionRow]:
    """fastonnx's Attention against ORT's MultiHeadAttention, batch 1, no padding."""
    from fastonnx import _native

    rng = np.random.default_rng(seed)
    rows = []
    jobs = [(mod, s) for mod in models for s in seqs]
    for i, (model, s) in enumerate(jobs):
        heads, h = ATTENTION_SHAPES[model]
        d = heads * h
        q, k, v = (rng.standard_normal((1, s, d), dtype=np.float32) for _ in range(3))
        mha, ours = build_attention_sessions(s, heads, d, threads)
        feeds_mha = {"q": q, "k": k, "v": v, "mask": np.zeros((1, 1, s, s), np.float32)}
        feeds_ours = {**feeds_mha, "mask": np.zeros((1, 1, 1, s), np.float32)}
        calls = [_bound_attention(mha, feeds_mha), _bound_attention(ours, feeds_ours)]
        t = time_interleaved(calls, warmup=warmup, runs=runs)
        y = ours.run(None, feeds_ours)[0].astype(np.float64).ravel()
        ref = attention_reference(q, k, v, heads).ravel()
        cosine = float(y @ ref / (np.linalg.norm(y) * np.linalg.norm(ref)))
        kernel = _native.attention_kernel_name()
        rows.append(AttentionRow(model, s, heads, h, kernel, *t, cosine))
        if progress:
            progress(i + 1, len(jobs), rows[-1])
    return rows


def format_attention_table(rows: list[AttentionRow]) -> str:
    head = (
        f"{'model':<10} {'S':>4} {'NxH':>6} | {'ORT MHA':>16} | {'fastonnx':>16} | "
        f"{'vs MHA':>6} | {'cosine':>8} | kernel"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mha = f"{r.mha.median_ms:7.3f}/{r.mha.p90_ms:7.3f}"
        ours = f"{r.fastonnx.median_ms:7.3f}/{r.fastonnx.p90_ms:7.3f}"
        lines.append(
            f"{r.model:<10} {r.s:>4} {f'{r.heads}x{r.head_size}':>6} | {mha:>16} | {ours:>16} | "
            f"{r.mha.median_ms / r.fastonnx.median_ms:5.2f}x | {r.cosine:.6f} | {r.kernel}"
        )
    lines.append("times: median/p90 ms per call (batch 1); cosine: fastonnx against float64")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    import onnxruntime as ort

    from fastonnx import __version__, _native

    cpu = cpu_model()
    features = _native.cpu_features()
    return {
        "cpu": cpu,
        "cpu_features": [k for k, v in features.items() if v is True],
        "onnxruntime": ort.__version__,
        "fastonnx": __version__,
        "threads": threads,
        "kernel_path": os.environ.get("FASTONNX_ISA") or _native.best_isa(),
        "load_average": os.getloadavg(),
    }


def format_table(rows: list[KernelRow]) -> str:
    width = max([len("fastonnx kernel")] + [len(r.kernel) for r in rows])
    head = (
        f"{'model':<10} {'layer':<8} {'KxN':>10} {'sparse':>6} | {'fp32 MatMul':>16} | "
        f"{'int8 DynQMatMul':>16} | {'fastonnx kernel':<{width}} {'fastonnx':>16} | "
        f"{'GOP/s':>6} {'eff.':>6} | {'vs int8':>7} {'vs fp32':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def cell(t: Timing) -> str:
            return f"{t.median_ms:7.3f}/{t.p90_ms:7.3f}"

        lines.append(
            f"{r.model:<10} {r.layer:<8} {f'{r.k}x{r.n}':>10} {r.sparsity:>6.0%} | "
            f"{cell(r.fp32_matmul):>16} | {cell(r.int8_dynamic):>16} | "
            f"{r.kernel:<{width}} {cell(r.fastonnx):>16} | {r.gops:6.0f} {r.effective_gops:6.0f} | "
            f"{r.int8_dynamic.median_ms / r.fastonnx.median_ms:6.2f}x "
            f"{r.fp32_matmul.median_ms / r.fastonnx.median_ms:6.2f}x"
        )
    lines.append(
        "times: median/p90 ms per call; GOP/s: fastonnx dense-equivalent (2*M*K*N) and effective "
        "(2*M*non-zero weights)"
    )
    return "\n".join(lines)


def write_json(
    path: str, rows: list[KernelRow], env: dict, attention: list[AttentionRow] = ()
) -> None:
    tmp = f"{path}.tmp"
    data = {
        "environment": env,
        "rows": [r.as_dict() for r in rows],
        "attention_rows": [r.as_dict() for r in attention],
    }
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
