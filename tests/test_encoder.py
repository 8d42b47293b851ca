"""fastonnx.Encoder: strings in, pooled vectors or class ids out, against the bare session."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_tokenizer import token_states

import fastonnx
from fastonnx.encoder import EncoderError

pytest.importorskip("transformers")

TEXTS = [
    "the movie was very good",
    "bad",
    "but the plot was long and dull and the actor was not good",
    "it is a film",
    "dull dull dull",
]


def bare_mean_pooled(model_path, tok, text):
    """One text, unpadded, through a plain session: the reference."""
    ids = np.array([tok(text)["input_ids"]], dtype=np.int64)
    return token_states(model_path, ids)[0].mean(axis=0)


def test_encode_matches_the_bare_session_in_input_order(tiny_bert, tokenizer):
    tok, folder = tokenizer
    enc = fastonnx.Encoder(tiny_bert, folder, threads=1)
    vectors = enc.encode(TEXTS, batch_size=2)
    assert vectors.shape == (len(TEXTS), 64) and vectors.dtype == np.float32
    for text, v in zip(TEXTS, vectors, strict=True):
        np.testing.assert_allclose(v, bare_mean_pooled(tiny_bert, tok, text), atol=2e-5)
    assert not enc.is_classifier


def test_sentence_transformers_pooling_config(tiny_bert, tokenizer, tmp_path):
    _, folder = tokenizer
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "modules.json").write_text(
        json.dumps([{"type": "sentence_transformers.models.Normalize"}])
    )
    try:
        enc = fastonnx.Encoder(tiny_bert, folder)
        assert enc.pooling == "cls" and enc.normalize
        v = enc.encode(TEXTS)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    finally:
        (folder / "modules.json").unlink()
        (folder / "1_Pooling" / "config.json").unlink()


def test_one_session_shared_by_threads(tiny_bert, tokenizer):
    _, folder = tokenizer
    enc = fastonnx.Encoder(tiny_bert, folder)
    expected = enc.encode(TEXTS)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(enc.encode(TEXTS, batch_size=3))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-6)


def test_bad_input(tiny_bert, tokenizer, tmp_path):
    _, folder = tokenizer
    enc = fastonnx.Encoder(tiny_bert, folder, max_length=8)
    assert enc.encode([]).shape == (0, 64)
    with pytest.raises(EncoderError, match=r"texts\[1\] is a int"):
        enc.encode(["fine", 3])
    with pytest.raises(EncoderError, match="not one string"):
        enc.encode("a sentence")
    long = " ".join(["good"] * 2000)  # far past max_length: truncated, not an error
    assert enc.encode([long]).shape == (1, 64)
    with pytest.raises(EncoderError, match="batch_size"):
        enc.encode(TEXTS, batch_size=0)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "identity.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(EncoderError, match="no 'input_ids' input"):
        fastonnx.Encoder(path, folder)


def test_classifier_predict(tokenizer, tmp_path):
    """A micro classifier: mean of embedded ids -> 2 logits; predict is the argmax."""
    tok, folder = tokenizer
    rng = np.random.default_rng(0)
    emb, w = rng.standard_normal((1000, 8)), rng.standard_normal((8, 2))
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "input_ids"], ["h"]),
            helper.make_node("ReduceMean", ["h", "axes"], ["p"], keepdims=0),
            helper.make_node("MatMul", ["p", "W"], ["logits"]),
        ],
        "clf",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 2])],
        initializer=[
            numpy_helper.from_array(emb.astype(np.float32), "E"),
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "clf.onnx"
    path.write_bytes(model.SerializeToString())
    enc = fastonnx.Encoder(path, folder)
    assert enc.is_classifier
    labels = enc(TEXTS[:1] + TEXTS[3:4])  # equal-length batch: no padding in the mean
    expected = [int((emb[tok(t)["input_ids"]].mean(0) @ w).argmax()) for t in (TEXTS[0], TEXTS[3])]
    assert labels.tolist() == expected


def test_long_texts_are_cut_to_the_model_positions(tiny_bert, tokenizer, tmp_path):
    """With the model's config.json beside the tokenizer, the default budget is its position
    count, so a text longer than the model takes is truncated, not an error inside ORT."""
    import shutil

    from encoders import MAX_POSITIONS

    from fastonnx.encoder import default_max_length

    tok, folder = tokenizer
    local = tmp_path / "tok"
    shutil.copytree(folder, local)
    (local / "config.json").write_text(json.dumps({"max_position_embeddings": MAX_POSITIONS}))
    enc = fastonnx.Encoder(tiny_bert, local, threads=1)
    assert enc.max_length == MAX_POSITIONS < tok.model_max_length
    long = " ".join(["good"] * (3 * MAX_POSITIONS))
    (v,) = enc.encode([long])
    ids = tok(long, truncation=True, max_length=MAX_POSITIONS)["input_ids"]
    ref = token_states(tiny_bert, np.array([ids], dtype=np.int64))[0].mean(axis=0)
    np.testing.assert_allclose(v, ref, atol=2e-5)
    roberta = {"max_position_embeddings": 66, "model_type": "roberta", "pad_token_id": 1}
    (local / "config.json").write_text(json.dumps(roberta))
    assert default_max_length(tok, local) == 64  # positions start at pad_token_id + 1
