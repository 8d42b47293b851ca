"""``fastonnx optimize`` end to end on a tiny random BERT, the Python API, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastonnx import verify
from fastonnx.calibration import synthesize
from fastonnx.cli import main
from fastonnx.model_io import InputError, external_data_files, load_model
from fastonnx.optimizer import optimize

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a an movie film plot actor story is was not very good bad long dull and but it"
VOCAB = SPECIAL_TOKENS + WORDS.split(" ")


def cli(*args) -> int:
    return main(["optimize", *map(str, args)])


def vanilla_session(path) -> ort.InferenceSession:
    """ORT without fastonnx's library: what an int8 user runs."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# Presets end to end


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--preset", "--calibration-text", "--tokenizer", "--verify", "sparse-int8"):
        assert expected in text


def test_fuse_preset(tiny_bert, tmp_path, capsys):
    out = tmp_path / "fused.onnx"
    assert cli(tiny_bert, "-o", out, "--preset", "fuse", "--verify") == 0
    text = capsys.readouterr().out
    assert "attention 2" in text and "verify" in text and "FAIL" not in text
    assert "MultiHeadAttention" in op_types(out)
    vanilla_session(out)  # com.microsoft ops only: vanilla ORT runs it


def test_int8_preset(tiny_bert, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert cli(tiny_bert, "-o", out, "--preset", "int8", "--verify") == 0
    captured = capsys.readouterr()
    assert "linear layers quantized 12" in captured.out
    assert "ORT kernels for linear layers: 12 int8, 0 float on dequantized weights" in captured.out
    assert "synthesized random tokens" in captured.err  # the calibration warning
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(out)

    # Independently of --verify: vanilla ORT runs it and it stays close to the float model.
    samples = synthesize(load_model(tiny_bert), num_samples=3, seed=5, warn=False).samples
    reference, quantized = vanilla_session(tiny_bert), vanilla_session(out)
    for sample in samples:
        want, got = reference.run(None, sample)[0], quantized.run(None, sample)[0]
        cos = float((want * got).sum() / (np.linalg.norm(want) * np.linalg.norm(got)))
        assert cos >= 0.99
    assert leftovers(tmp_path) == []


def test_int8_default_output_name_and_npz_calibration(tiny_bert, tmp_path, capsys):
    src = tmp_path / "model.onnx"
    src.write_bytes(tiny_bert.read_bytes())
    for data_file in external_data_files(tiny_bert):  # the same relative names
        (tmp_path / data_file.name).write_bytes(data_file.read_bytes())
    samples = synthesize(load_model(src), num_samples=5, seed=3, warn=False).samples
    npz = tmp_path / "calib.npz"
    np.savez(npz, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})

    assert cli(src, "--preset", "int8", "--calibration", npz, "--num-samples", 3) == 0
    captured = capsys.readouterr()
    assert f"3 samples from {npz}" in captured.out
    assert "synthesized" not in captured.err
    assert (tmp_path / "model.fast.onnx").is_file()


def test_int8_text_calibration(tiny_bert, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer_dir = tmp_path / "tokenizer"
    transformers.BertTokenizer(str(vocab)).save_pretrained(tokenizer_dir)
    text = tmp_path / "sentences.txt"
    text.write_text("the movie was very good\n\nbut the plot was long and dull\nit is funny\n")

    out = tmp_path / "out.onnx"
    args = ["--calibration-text", text, "--tokenizer", tokenizer_dir, "--preset", "int8"]
    assert cli(tiny_bert, "-o", out, *args) == 0
    assert "3 samples from" in capsys.readouterr().out  # the empty line is skipped
    assert "QuantizeLinear" in op_types(out)


def test_verify_beyond_tolerance_exits_1(tiny_bert, tmp_path, capsys, monkeypatch):
    # No model can reach a cosine above 1: this tolerance must fail.
    monkeypatch.setitem(verify.TOLERANCES, "fuse", verify.Tolerance(min_cosine=1.5))
    assert cli(tiny_bert, "-o", tmp_path / "out.onnx", "--preset", "fuse", "--verify") == 1
    assert "FAIL" in capsys.readouterr().out


def _prune(src: Path, dst: Path, fraction: float = 0.8) -> None:
    """Zero ``fraction`` of each weight's 1x4 groups (4 consecutive input features of one output
    channel), the structure fastonnx's sparse kernels skip."""
    import onnx_ir as ir

    from fastonnx.model_io import save_model

    model = load_model(src)
    rng = np.random.default_rng(0)
    for node in model.graph:
        weight = node.inputs[1].const_value if node.op_type == "MatMul" else None
        if weight is None:
            continue
        w = weight.numpy()
        k, n = w.shape
        keep = rng.random((k // 4, 1, n)) >= fraction
        pruned = (w.reshape(k // 4, 4, n) * keep).reshape(k, n)
        node.inputs[1].const_value = ir.tensor(pruned, name=node.inputs[1].name)
    save_model(model, dst)


def test_sparse_preset(tiny_bert, tmp_path, capsys):
    pytest.importorskip("fastonnx.passes.lower_sparse")
    pytest.importorskip("fastonnx._native")
    # Random weights are dense: nothing is lowered, the result is the int8 model.
    dense = tmp_path / "dense.onnx"
    assert cli(tiny_bert, "-o", dense, "--preset", "sparse-int8", "--min-sparsity", "0.5") == 0
    assert "kept on ORT int8: 12 x " in capsys.readouterr().out
    assert "QuantizeLinear" in op_types(dense) and "SparseLinear" not in op_types(dense)

    pruned, out = tmp_path / "pruned.onnx", tmp_path / "sparse.onnx"
    _prune(tiny_bert, pruned)
    assert cli(pruned, "-o", out, "--preset", "sparse-int8", "--verify", "-v") == 0
    text = capsys.readouterr().out
    assert "SparseLinear 12" in text and "block 1x4" in text
    assert "cosine min" in text and "FAIL" not in text
    graph = onnx.load(out, load_external_data=False).graph
    fastonnx_ops = [n.op_type for n in graph.node if n.domain == "com.fastonnx"]
    # 12 layers lowered; each block's Q/K/V merged into one (lower_attention): 2 x 2 fewer.
    assert fastonnx_ops.count("SparseLinear") == 8 and fastonnx_ops.count("Attention") == 2
    assert "Attention 2" in text and "QKV projections merged 2" in text


def test_sparse_preset_without_lowering_fails_early(tiny_bert, tmp_path, capsys):
    try:
        import fastonnx.passes.lower_sparse  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        pytest.skip("this build has the sparse lowering")
    out = tmp_path / "sparse.onnx"
    assert cli(tiny_bert, "-o", out, "--preset", "sparse-int8") == 2
    err = capsys.readouterr().err
    assert "needs fastonnx.passes.lower_sparse" in err and "--preset int8" in err
    assert "synthesized" not in err  # it failed before calibrating
    assert not out.exists()


def test_synthesized_inputs_are_valid(tiny_bert):
    model = load_model(tiny_bert)
    data = synthesize(model, num_samples=4, seq_len=12, seed=0, warn=False)
    assert data.synthetic and len(data) == 4
    for i, sample in enumerate(data.samples):
        assert set(sample) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(a.shape == (1, 12) and a.dtype == np.int64 for a in sample.values())
        assert sample["input_ids"].min() >= 0 and sample["input_ids"].max() < 1000  # the vocab
        assert not sample["token_type_ids"].any()
        padded = (sample["attention_mask"] == 0).sum()
        assert padded == (3 if i % 2 else 0)  # every other sample pads its last quarter
        assert not sample["input_ids"][sample["attention_mask"] == 0].any()


def test_python_api(tiny_bert, tmp_path):
    result = optimize(tiny_bert, preset="int8", num_samples=4)
    report = result.report
    assert report.changed and len(report.quantized) == 12
    assert report.weights_bytes_after < report.weights_bytes_before
    assert [p.name for p in report.passes] == ["fuse", "quantize", "ort_int8_range"]
    assert report.calibration == "4 samples from synthetic"
    assert report.to_dict()["passes"][1]["counts"]["linear layers quantized"] == 12
    out = result.save(tmp_path / "api.onnx")
    vanilla_session(out)
    with pytest.raises(InputError, match="refusing to write"):
        result.save(tiny_bert)  # never over the input


# --------------------------------------------------------------------------------------------
# Bad input


def tiny_proto(opset: int = 17, ir_version: int = 10) -> onnx.ModelProto:
    """Not an encoder: one Add."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 256])],
        [numpy_helper.from_array(np.ones(256, np.float32), "b")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _not_onnx(path: Path) -> None:
    path.write_text("hello\n" * 50)


def _truncated(path: Path) -> None:
    data = tiny_proto().SerializeToString()
    path.write_bytes(data[: len(data) * 2 // 3])


def _missing_external_data(path: Path) -> None:
    onnx.save_model(
        tiny_proto(), path, save_as_external_data=True, location="w.data", size_threshold=0
    )
    (path.parent / "w.data").unlink()


def _unsupported_opset(path: Path) -> None:
    onnx.save_model(tiny_proto(opset=99), path)


def _unsupported_ir(path: Path) -> None:
    onnx.save_model(tiny_proto(ir_version=99), path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "no such file"),
        (_not_onnx, "not an ONNX model"),
        (_truncated, "truncated"),
        (_missing_external_data, "missing external data file 'w.data'"),
        (_unsupported_opset, "opset 99"),
        (_unsupported_ir, "IR version 99"),
    ],
)
@pytest.mark.parametrize("preset", ["fuse", "int8"])
def test_bad_input(tmp_path, capsys, make, message, preset):
    src = tmp_path / "in.onnx"
    if make is not None:
        make(src)
    out = tmp_path / "out.onnx"
    assert cli(src, "-o", out, "--preset", preset) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastonnx optimize: error: ")
    assert message in err[0]
    assert not out.exists() and not Path(f"{out}.data").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--min-sparsity", "1.5"], "--min-sparsity must be between 0 and 1"),
        (["--tokenizer", "tok"], "--tokenizer is only used with --calibration-text"),
        (["--calibration-text", "t.txt"], "--calibration-text needs --tokenizer"),
        (["--calibration", "absent.npz"], "absent.npz: no such file"),
    ],
)
def test_bad_options(tiny_bert, tmp_path, capsys, args, message):
    out = tmp_path / "out.onnx"
    assert cli(tiny_bert, "-o", out, "--preset", "int8", *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_npz_missing_an_input(tiny_bert, tmp_path, capsys):
    npz = tmp_path / "calib.npz"
    np.savez(npz, input_ids=np.ones((2, 8), np.int64))
    assert cli(tiny_bert, "-o", tmp_path / "o.onnx", "--preset", "int8", "--calibration", npz) == 2
    assert "no array for model input(s) attention_mask, token_type_ids" in capsys.readouterr().err


def test_output_is_input(tiny_bert, capsys):
    assert cli(tiny_bert, "-o", tiny_bert, "--preset", "fuse") == 2
    assert "is the input model" in capsys.readouterr().err


def test_no_encoder_pattern_is_reported_not_an_error(tmp_path, capsys):
    src = tmp_path / "add.onnx"
    onnx.save_model(tiny_proto(), src)
    out = tmp_path / "out.onnx"
    assert cli(src, "-o", out, "--preset", "int8") == 0
    text = capsys.readouterr().out
    assert "no transformer encoder pattern" in text and "model unchanged" in text
    assert op_types(out) == {"Add"}
    result = optimize(src, preset="sparse-int8")  # no pass runs, so none is needed
    assert not result.report.changed and result.report.passes == []


def test_user_errors_print_no_traceback(tmp_path):
    src = tmp_path / "in.onnx"
    _not_onnx(src)
    proc = subprocess.run(
        [sys.executable, "-m", "fastonnx", "optimize", str(src), "--preset", "int8"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not an ONNX model" in proc.stderr
