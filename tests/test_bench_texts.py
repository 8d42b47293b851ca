"""`fastonnx bench MODEL.onnx --texts FILE --tokenizer DIR`: batches of real sentences padded to
their longest, packed vs padded fastonnx beside ORT and OpenVINO (figures are not asserted:
only that they are produced and consistent)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastonnx._native")
pytest.importorskip("onnxruntime")

from fastonnx.bench.model import BenchError, valid_positions  # noqa: E402
from fastonnx.bench.texts import make_batches, read_texts  # noqa: E402

SENTENCES = [
    "a fine film",
    "the plot is thin and the acting is worse than the script",
    "moving",
    "it is neither funny nor sad , only long",
    "one of the year 's best",
]


def test_read_texts_lines_and_csv(tmp_path):
    lines = tmp_path / "s.txt"
    lines.write_text("\n".join(SENTENCES) + "\n\n", encoding="utf-8")
    assert read_texts(lines) == SENTENCES
    table = tmp_path / "s.csv"
    table.write_text("\n".join(f'1,"{s}"' for s in SENTENCES), encoding="utf-8-sig")
    assert read_texts(table) == SENTENCES
    empty = tmp_path / "e.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(BenchError, match="no non-empty lines"):
        read_texts(empty)


def test_batches_are_padded_to_their_longest(tokenizer):
    tok, _ = tokenizer
    names = ["input_ids", "attention_mask", "token_type_ids"]
    data = make_batches(SENTENCES, tok, batch=2, count=4, max_len=8, seed=0, input_names=names)
    assert data.sequences == 8 and len(data.feeds) == 4
    for feed in data.feeds:
        mask = feed["attention_mask"]
        assert set(feed) == set(names) and mask.shape[0] == 2 and mask.shape[1] <= 8
        assert mask.sum(1).max() == mask.shape[1]  # the longest sentence fills the batch
    assert data.tokens == sum(int(f["attention_mask"].sum()) for f in data.feeds)
    assert data.slots == sum(f["attention_mask"].size for f in data.feeds)


def test_valid_positions_zero_padding_only():
    out = np.ones((2, 3, 4))
    mask = np.array([[1, 0, 1], [0, 0, 1]])
    got = valid_positions(out, mask)
    assert (got[mask == 0] == 0).all() and (got[mask == 1] == 1).all()
    assert valid_positions(np.ones((2, 5)), mask).sum() == 10  # not a token output: unchanged


def test_text_bench_end_to_end(tiny_bert, tokenizer, tmp_path, monkeypatch):
    from fastonnx.cli import main
    from fastonnx.passes import lower_sparse

    # Every layer lowered on every CPU (AVX2 ones keep dense layers on ORT, which keeps the
    # model padded), so the packed variant is packed here.
    monkeypatch.setattr(lower_sparse, "auto_min_sparsity", lambda: 0.0)

    _, folder = tokenizer
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES * 4), encoding="utf-8")
    out = tmp_path / "out"
    args = [
        "bench",
        str(tiny_bert),
        "--texts",
        str(texts),
        "--tokenizer",
        str(folder),
        "--batch-sizes",
        "4",
        "--threads",
        "1",
        "--runs",
        "2",
        "--text-batches",
        "2",
        "--num-samples",
        "4",
        "-q",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    document = json.loads((out / "bench-texts.json").read_text())
    rows = {r["key"]: r for r in document["rows"]}
    assert list(rows) == ["ort-int8", "fastonnx", "fastonnx-padded", "openvino-qdq"]
    assert document["sequences"] == 8 and 0 < document["fill"] < 1
    packed, padded = rows["fastonnx"], rows["fastonnx-padded"]
    assert any(n.startswith("packed execution: ") for n in packed["notes"]), packed["notes"]
    assert packed["padded_positions_zero"] is True
    assert packed["cosine_min"] >= 0.9999 and padded["cosine_min"] == pytest.approx(1.0)
    for row in (packed, padded, rows["ort-int8"]):
        assert row["status"] == "ok" and row["sequences_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(
            row["sequences_per_s"] * document["tokens"] / document["sequences"]
        )


def test_texts_needs_a_tokenizer(tiny_bert, tmp_path, capsys):
    from fastonnx.cli import main

    assert main(["bench", str(tiny_bert), "--texts", str(tmp_path / "x.txt")]) == 2
    assert "--texts and --tokenizer go together" in capsys.readouterr().err
