"""`fastonnx bench MODEL.onnx` end to end on tiny models, with tiny repeat counts.

Checks that every available variant builds and runs, the JSON has its documented fields, the
chart is a PNG, absent runtimes are skipped and a model fastonnx cannot optimize is reported per
variant. No timing assertions: benchmarks print figures, tests check that they are produced.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastonnx.bench.model import BenchConfig, Progress, run_model_bench, time_rounds
from fastonnx.bench.profile import summarize_trace
from fastonnx.bench.report import format_table, to_json
from fastonnx.bench.variants import DEFAULT_KEYS, SPECS
from fastonnx.cli import main

ALL_KEYS = list(DEFAULT_KEYS)  # what runs without --variants
OPENVINO_KEYS = {"openvino", "openvino-qdq"}
TINY = ["--seq-len", "16", "--threads", "1", "2", "--batch-sizes", "2"]
TINY += ["--warmup", "1", "--runs", "3", "--parity-samples", "2", "--num-samples", "4"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def bench(*args) -> tuple[int, str, str]:
    """Run the CLI; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["bench", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def sparse_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT whose encoder linear layers have 90% of their 1x4 weight groups
    zero, so variant 5 really runs fastonnx's sparse kernels."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from encoders import build_encoder

    from fastonnx.export import export_encoder

    model = build_encoder("bert", "sdpa")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "encoder" in name:
                n, k = module.weight.shape  # [out, in]: a group is 4 consecutive inputs
                keep = torch.rand(n, k // 4, generator=generator) >= 0.9
                module.weight.mul_(keep.repeat_interleave(4, dim=1))
    return export_encoder(model, tmp_path_factory.mktemp("sparse_bert") / "model.onnx")


def classifier_proto() -> onnx.ModelProto:
    """x [B, 8] -> MatMul -> Add -> logits [B, 3]: no encoder pattern for fastonnx to optimize."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    # ORT 1.31 loads IR <= 13; onnx would otherwise write its newest.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path]:
    """The classifier model and an --eval-data file whose labels are its own predictions."""
    folder = tmp_path_factory.mktemp("classifier")
    proto = classifier_proto()
    path = folder / "classifier.onnx"
    onnx.save_model(proto, path)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    b = numpy_helper.to_array(proto.graph.initializer[1])
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    data = folder / "eval.npz"
    np.savez(data, x=x, labels=(x @ w + b).argmax(axis=1).astype(np.int64))
    return path, data


@pytest.fixture(scope="module")
def full_run(sparse_bert, tmp_path_factory):
    """One run of every variant, with --profile: (exit status, stdout, stderr, JSON, out dir)."""
    out_dir = tmp_path_factory.mktemp("bench_out")
    rc, stdout, stderr = bench(sparse_bert, *TINY, "--profile", "-o", out_dir)
    document = json.loads((out_dir / "bench.json").read_text())
    return rc, stdout, stderr, document, out_dir


def variants_by_key(document: dict) -> dict[str, dict]:
    return {v["key"]: v for v in document["variants"]}


# --------------------------------------------------------------------------------------------
# The whole run


def test_every_available_variant_runs(full_run):
    rc, _, _, document, _ = full_run
    assert rc == 0
    variants = variants_by_key(document)
    assert list(variants) == ALL_KEYS
    for key, v in variants.items():
        if key in OPENVINO_KEYS and not openvino_installed():
            assert v["status"] == "skipped"
            continue
        assert v["status"] == "ok", (key, v["error"])
        assert len(v["timings"]) == 3  # b1 t1, b1 t2, b2 t2
        for t in v["timings"]:
            assert t["error"] is None and t["runs"] == 3
            assert t["median_ms"] > 0 and t["p90_ms"] >= t["median_ms"]
        assert v["parity"]["cosine_min"] > 0.99, key
    assert variants["ort-fp32"]["timings"][0]["speedup_vs_ort_fp32"] == pytest.approx(1.0)
    assert variants["ort-int8"]["timings"][0]["speedup_vs_ort_int8"] == pytest.approx(1.0)
    # The pruned layers really run on fastonnx's kernels.
    assert any(
        "12 of 12 layers on fastonnx sparse kernels" in n for n in variants["fastonnx"]["notes"]
    )
    if openvino_installed():
        assert variants["openvino"]["precision"] in {"f32", "bf16", "f16"}


def test_json_has_the_documented_fields(full_run):
    _, _, _, document, out_dir = full_run
    assert document["schema"] == "fastonnx-bench-model/1"
    assert {"model", "environment", "load_average_after", "config", "settings", "variants"} <= set(
        document
    )
    assert {"profile", "notes", "chart"} <= set(document)
    env = document["environment"]
    for field in ("cpu", "cpu_features", "onnxruntime", "fastonnx", "openvino", "threads"):
        assert field in env
    assert {"kernel_path", "ort_spinning", "load_average"} <= set(env)
    config = document["config"]
    for field in ("seq_len", "threads", "batch_sizes", "warmup", "runs", "seed", "variants"):
        assert field in config
    assert config["seq_len"] == 16 and config["threads"] == [1, 2]
    assert [s["label"] for s in document["settings"]] == ["b1 t1", "b1 t2", "b2 t2"]
    variant_fields = {"key", "number", "label", "runtime", "precision", "status", "error"}
    variant_fields |= {"model_path", "notes", "prepare_seconds", "parity", "accuracy", "timings"}
    timing_fields = {"setting", "batch", "threads", "median_ms", "p90_ms", "runs", "error"}
    timing_fields |= {"throughput_seq_per_s", "speedup_vs_ort_fp32", "speedup_vs_ort_int8"}
    parity_fields = {"output", "samples", "cosine_min", "cosine_mean", "max_abs_diff", "error"}
    for v in document["variants"]:
        assert set(v) == variant_fields
        if v["status"] == "ok":
            assert set(v["parity"]) == parity_fields
            assert all(set(t) == timing_fields for t in v["timings"])
    assert document["chart"] == str(out_dir / "bench.png")
    # Optimized models are kept, so a later run can pass them with --fastonnx-model.
    for key in ("ort-opt", "ort-int8", "fastonnx-qdq", "fastonnx"):
        assert Path(variants_by_key(document)[key]["model_path"]).is_file()


def test_profile_covers_fastonnx_and_the_best_ort_int8(full_run):
    _, stdout, _, document, _ = full_run
    profiled = [p["variant"] for p in document["profile"]]
    assert profiled[0] == "fastonnx" and profiled[1] in {"ort-int8", "fastonnx-qdq"}
    for p in document["profile"]:
        assert {"threads", "batch", "runs", "run_ms", "kernels_ms", "trace", "ops"} <= set(p)
        assert p["runs"] == 3 and Path(p["trace"]).is_file()
        assert sum(op["percent"] for op in p["ops"]) == pytest.approx(100.0, abs=0.01)
        assert set(p["ops"][0]) == {"op_type", "ms_per_run", "percent", "calls_per_run"}
    fastonnx_ops = {op["op_type"] for op in document["profile"][0]["ops"]}
    assert "SparseLinear" in fastonnx_ops
    assert "profile: fastonnx sparse-int8" in stdout and "op type" in stdout


def test_chart_is_a_png(full_run):
    _, _, _, _, out_dir = full_run
    data = (out_dir / "bench.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 400 and height > 200


def test_terminal_table_and_progress(full_run):
    _, stdout, stderr, _, _ = full_run
    assert "# " in stdout and "onnxruntime" in stdout and "load average" in stdout
    for spec in SPECS:
        if spec.key in DEFAULT_KEYS:
            assert spec.label in stdout
    assert "speed-up" in stdout and "ms med/p90" in stdout and "seq/s" in stdout
    assert "preparing" in stderr and "timing batch 1, 1 thread" in stderr


# --------------------------------------------------------------------------------------------
# Failures are rows, not aborts


def test_model_that_cannot_be_optimized(classifier, tmp_path):
    model, eval_data = classifier
    rc, stdout, _ = bench(model, *TINY, "--eval-data", eval_data, "-o", tmp_path)
    assert rc == 0
    document = json.loads((tmp_path / "bench.json").read_text())
    variants = variants_by_key(document)
    for key in ("fastonnx-qdq", "fastonnx"):
        assert variants[key]["status"] == "failed"
        assert "no transformer encoder pattern" in variants[key]["error"]
        assert variants[key]["timings"][0]["median_ms"] is None
    for key in ("ort-fp32", "ort-int8"):
        assert variants[key]["status"] == "ok"
        assert variants[key]["timings"][0]["median_ms"] > 0
    assert variants["ort-fp32"]["accuracy"] == 1.0
    if openvino_installed():
        assert variants["openvino-qdq"]["status"] == "failed"
        assert "no QDQ model" in variants["openvino-qdq"]["error"]
    assert "failed: prepare:" in stdout
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_SIGNATURE


def test_openvino_absent_is_skipped(classifier, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises
    config = BenchConfig(
        model=classifier[0],
        out_dir=tmp_path,
        seq_len=4,
        threads=(1,),
        batch_sizes=(),
        warmup=0,
        runs=2,
        variants=("ort-fp32", "openvino", "openvino-qdq"),
    )
    result = run_model_bench(config, Progress(enabled=False))
    document = to_json(result)
    variants = variants_by_key(document)
    assert variants["ort-fp32"]["timings"][0]["median_ms"] > 0
    for key in OPENVINO_KEYS:
        assert variants[key]["status"] == "skipped"
        assert "not installed" in variants[key]["error"]
    assert document["environment"]["openvino"] is None
    assert "skipped: OpenVINO is not installed" in format_table(result)


def test_given_models_skip_optimizing_and_a_broken_one_is_reported(full_run, tmp_path):
    _, _, _, document, _ = full_run
    variants = variants_by_key(document)
    qdq = variants["fastonnx-qdq"]["model_path"]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    rc, _, _ = bench(
        document["model"], *TINY, "--variants", "ort-fp32", "fastonnx-qdq", "fastonnx",
        "--qdq-model", qdq, "--fastonnx-model", broken, "-o", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0
    again = variants_by_key(json.loads((tmp_path / "out" / "bench.json").read_text()))
    assert again["fastonnx-qdq"]["status"] == "ok"
    assert f"given: {qdq}" in again["fastonnx-qdq"]["notes"]
    assert again["fastonnx"]["status"] == "failed"
    assert again["fastonnx"]["error"].startswith("session:")


# --------------------------------------------------------------------------------------------
# Command line


def test_help_shows_both_forms(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "fastonnx bench kernels" in text and "fastonnx bench MODEL.onnx" in text
    with pytest.raises(SystemExit):
        main(["bench", "model.onnx", "--help"])
    text = capsys.readouterr().out
    for option in ("--eval-data", "--profile", "--fastonnx-model", "--qdq-model", "--seq-len"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--help"])
    assert "--sparsity" in capsys.readouterr().out


def test_bench_kernels_still_works(tmp_path):
    out = tmp_path / "kernels.json"
    rc, stdout, _ = bench(
        "kernels", "--models", "minilm", "--sparsity", "0.9", "-m", "4",
        "--warmup", "0", "--runs", "1", "--attention-seq", "16", "--json", out,
    )  # fmt: skip
    assert rc == 0 and "GOP/s" in stdout and "vs MHA" in stdout
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4
    (attention,) = data["attention_rows"]
    assert attention["s"] == 16 and attention["cosine"] >= 0.9999


def test_bad_input_exits_2(classifier, tmp_path):
    rc, _, stderr = bench(tmp_path / "missing.onnx", "-o", tmp_path)
    assert rc == 2 and "no such file" in stderr
    no_labels = tmp_path / "no_labels.npz"
    np.savez(no_labels, x=np.zeros((4, 8), np.float32))
    rc, _, stderr = bench(classifier[0], "--eval-data", no_labels, "-o", tmp_path)
    assert rc == 2 and "labels" in stderr
    rc, _, stderr = bench(classifier[0], "--calibration", no_labels.with_name("none.npz"))
    assert rc == 2 and "no such file" in stderr
    with pytest.raises(SystemExit) as info:  # argparse's own exit for a bad option value
        bench(classifier[0], "--threads", "0")
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------
# Pieces


def test_time_rounds_drops_a_failing_call():
    calls = {"a": lambda: None, "b": lambda: 1 / 0}
    timings, errors = time_rounds(calls, warmup=1, runs=4)
    assert timings["a"].runs == 4
    assert "b" not in timings and "ZeroDivisionError" in errors["b"]


def test_summarize_trace_skips_warmup_runs():
    def run(ts: int, dur: int) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts: int, op: str, dur: int) -> dict:
        return {"cat": "Node", "name": f"n_{ts}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}  # fmt: skip

    events = [run(0, 100), node(10, "MatMul", 90)]  # warm-up: not counted
    events += [run(200, 100), node(210, "MatMul", 60), node(280, "Add", 20)]
    events += [run(400, 120), node(410, "MatMul", 60), node(480, "Add", 20)]
    runs, run_ms, kernels_ms, ops = summarize_trace(events, skip_runs=1)
    assert runs == 2 and run_ms == pytest.approx(0.11) and kernels_ms == pytest.approx(0.08)
    assert [(o.op_type, o.percent, o.calls_per_run) for o in ops] == [
        ("MatMul", 75.0, 1.0),
        ("Add", 25.0, 1.0),
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {
                "vendor_id": "AuthenticAMD",
                "cpu family": "25",
                "model": "17",
                "model name": "AMD EPYC",
            },
            "AMD EPYC (family 25 model 17: Zen 4)",
        ),
        (
            {
                "vendor_id": "AuthenticAMD",
                "cpu family": "26",
                "model": "2",
                "model name": "AMD EPYC",
            },
            "AMD EPYC (family 26 model 2: Zen 5)",
        ),
        (
            {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "207", "model name": "Xeon"},
            "Xeon (family 6 model 207: Emerald Rapids)",
        ),
        (  # unknown models keep family and model, without a guess
            {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "1", "model name": "X"},
            "X (family 6 model 1)",
        ),
        ({"model name": "Some CPU", "cpu family": "?"}, "Some CPU"),
    ],
)
def test_cpu_description_names_the_core(fields, expected):
    from fastonnx.bench.timing import describe_cpu

    assert describe_cpu(fields) == expected


@pytest.mark.parametrize("spin", [True, False])
def test_spinning_is_stopped_between_interleaved_runs(spin):
    """Spinning workers stop when a run returns, so an idle session cannot slow the next one;
    --no-spin makes them sleep between operators instead."""
    from fastonnx.bench.variants import ort_session_options

    so = ort_session_options(2, fastonnx=False, spin=spin)
    if spin:
        assert so.get_session_config_entry("session.force_spinning_stop") == "1"
        # allow_spinning is left unset: ORT's default, spinning on
        with pytest.raises(RuntimeError, match="allow_spinning"):
            so.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
