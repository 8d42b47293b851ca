"""The request handling of `fastonnx serve` (no Ray): parsing, bounds, answers, routes; and the
models it serves (token-id model + tokenizer, tokenizer-inside model) against fastonnx.Encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastonnx.cli import main
from fastonnx.serving.backend import EMBEDDINGS, LOGITS, BackendError, TextModel, load_text_model
from fastonnx.serving.handler import RequestHandler

TEXTS = ["the movie was very good", "bad", "but the plot was long and dull"]


def fake_model(kind=EMBEDDINGS, dim=3):
    """Rows that depend on the text (its length, its first character), so order is checked."""
    calls = []

    def run(texts):
        calls.append(list(texts))
        return np.array([[len(t), ord(t[0]) if t else 0, i] for i, t in enumerate(texts)])[
            :, :dim
        ].astype(np.float32)

    model = TextModel("/models/fake.onnx", kind, False, run, dim)
    return model, calls


def post(handler, payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = handler.handle_encode(body)
    return r.status, json.loads(r.json_bytes())


def test_good_request_gives_embeddings_in_order():
    model, calls = fake_model()
    status, body = post(RequestHandler(model), {"texts": TEXTS})
    assert status == 200
    assert body["dim"] == 3
    assert body["embeddings"] == [[len(t), ord(t[0]), i] for i, t in enumerate(TEXTS)]
    assert calls == [TEXTS]


def test_classifier_gives_labels_and_logits():
    model, _ = fake_model(LOGITS, dim=2)
    status, body = post(RequestHandler(model), {"texts": ["ab", "c"]})
    assert status == 200
    assert body["logits"] == [[2, ord("a")], [1, ord("c")]]
    assert body["labels"] == [1, 1]


def test_answer_many_splits_one_model_call_between_requests():
    model, calls = fake_model()
    handler = RequestHandler(model)
    answers = handler.answer_many([["a", "bb"], ["ccc"]])
    assert calls == [["a", "bb", "ccc"]]
    assert [len(a["embeddings"]) for a in answers] == [2, 1]
    assert answers[1]["embeddings"][0][:2] == [3, ord("c")]


@pytest.mark.parametrize(
    ("payload", "status", "kind", "message"),
    [
        (b"{not json", 400, "bad_json", "not valid JSON"),
        (b"\xff\xfe", 400, "bad_json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "bad_json", "not valid JSON"),
        (["a"], 400, "bad_request", "expected an object"),
        ({"text": ["a"]}, 400, "bad_request", "unknown key(s) ['text']"),
        ({}, 400, "bad_request", 'missing "texts"'),
        ({"texts": "one string"}, 400, "bad_request", "got a string"),
        ({"texts": []}, 400, "bad_request", '"texts" is empty'),
        ({"texts": ["ok", 3]}, 400, "bad_request", "texts[1] is a number"),
        ({"texts": ["ok", None]}, 400, "bad_request", "texts[1] is a null"),
        ({"texts": [["nested"]]}, 400, "bad_request", "texts[0] is a list"),
        ({"texts": ["x"] * 5}, 413, "too_large", "5 texts; at most 4"),
        ({"texts": ["ok", "y" * 11]}, 413, "too_large", "texts[1] has 11 characters; at most 10"),
    ],
)
def test_bad_requests_are_clear_4xx(payload, status, kind, message):
    model, calls = fake_model()
    handler = RequestHandler(model, max_texts=4, max_text_chars=10, max_body_bytes=1 << 20)
    got_status, body = post(handler, payload)
    assert (got_status, body["error"]["kind"]) == (status, kind)
    assert message in body["error"]["message"]
    assert calls == []  # the model never saw a refused request


def test_body_size_is_checked_before_parsing():
    model, _ = fake_model()
    handler = RequestHandler(model, max_body_bytes=64)
    status, body = post(handler, {"texts": ["a" * 100]})
    assert (status, body["error"]["kind"]) == (413, "too_large")
    assert "over 64 bytes" in body["error"]["message"]


def test_model_failure_is_a_500_naming_it():
    def broken(texts):
        raise RuntimeError("session lost")

    handler = RequestHandler(TextModel("m.onnx", EMBEDDINGS, False, broken, 3))
    status, body = post(handler, {"texts": ["a"]})
    assert status == 500 and body["error"]["kind"] == "internal"
    assert "session lost" in body["error"]["message"]


def test_routes_and_health():
    model, _ = fake_model()
    handler = RequestHandler(model)
    assert handler.route("POST", "/") == "encode"
    assert handler.route("POST", "/encode/") == "encode"
    assert handler.route("GET", "/health") == "health"
    assert handler.route("GET", "/").status == 405
    assert handler.route("POST", "/health").status == 405
    assert handler.route("GET", "/admin").status == 404
    health = handler.health()
    assert health.status == 200 and health.body["status"] == "ok"
    assert health.body["model"] == "fake.onnx" and health.body["dim"] == 3


def test_limits_must_be_positive():
    model, _ = fake_model()
    with pytest.raises(ValueError, match="max_texts must be a positive integer"):
        RequestHandler(model, max_texts=0)


# -- the real models the server loads ------------------------------------------------------


def test_token_model_with_tokenizer_serves_encoder_vectors(tiny_bert, tokenizer):
    import fastonnx

    _, folder = tokenizer
    model = load_text_model(tiny_bert, folder, threads=1)
    assert model.kind == EMBEDDINGS and not model.tokenizer_inside and model.dim == 64
    status, body = post(RequestHandler(model), {"texts": TEXTS})
    assert status == 200
    want = fastonnx.Encoder(tiny_bert, folder, threads=1).encode(TEXTS)
    np.testing.assert_allclose(np.array(body["embeddings"]), want, atol=1e-6)


def test_long_text_is_truncated_not_an_error(tiny_bert, tokenizer):
    _, folder = tokenizer
    model = load_text_model(tiny_bert, folder, threads=1, max_length=64)  # its positions
    long = "the movie was good " * 400  # 1,600 words: past the model's 64 positions
    status, body = post(RequestHandler(model), {"texts": [long, "bad"]})
    assert status == 200 and len(body["embeddings"]) == 2
    assert np.isfinite(np.array(body["embeddings"])).all()


def test_tokenizer_inside_model_matches_the_encoder(tiny_bert, tokenizer, tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    import fastonnx

    _, folder = tokenizer
    packaged = tmp_path / "text.onnx"
    assert main(["package", str(tiny_bert), "-o", str(packaged), "--tokenizer", str(folder)]) == 0
    model = load_text_model(packaged, threads=1)
    assert model.tokenizer_inside and model.kind == EMBEDDINGS
    status, body = post(RequestHandler(model), {"texts": TEXTS})
    assert status == 200
    want = fastonnx.Encoder(tiny_bert, folder, threads=1).encode(TEXTS)
    np.testing.assert_allclose(np.array(body["embeddings"]), want, atol=2e-5)
    with pytest.raises(BackendError, match="has the tokenizer inside"):
        load_text_model(packaged, folder)


def test_models_that_cannot_be_served(tiny_bert, tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        load_text_model(tmp_path / "none.onnx")
    with pytest.raises(BackendError, match="takes token ids: give the Hugging Face tokenizer"):
        load_text_model(tiny_bert)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(BackendError, match="not an ONNX model"):
        load_text_model(junk, tmp_path)


def test_model_without_token_inputs_is_refused(tmp_path, tokenizer):
    import onnx
    from onnx import TensorProto, helper

    _, folder = tokenizer
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    with pytest.raises(BackendError, match="no 'input_ids' input"):
        load_text_model(path, folder)


def test_serve_command_bad_input_exits_2(tiny_bert, tmp_path, capsys, monkeypatch):
    assert main(["serve", str(tiny_bert), "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(tiny_bert), "--min-replicas", "1"]) == 2
    assert "--min-replicas needs --max-replicas" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", str(tiny_bert)]) == 2
    assert "fastonnx[serve]" in capsys.readouterr().err


def test_serve_run_builder_arguments_and_deployment_options():
    pytest.importorskip("ray")  # imports Ray only; starts no cluster
    from fastonnx.serving.ray_app import ServeOptions

    o = ServeOptions.from_args(
        {"model": "/m.onnx", "tokenizer": "/tok", "replicas": "2", "batch_wait_timeout_s": "0.01"}
    )
    assert (o.model, o.tokenizer, o.replicas, o.batch_wait_timeout_s) == (
        "/m.onnx",
        "/tok",
        2,
        0.01,
    )
    assert o.deployment_options() == {
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": 1},
        "num_replicas": 2,
    }
    scaled = ServeOptions(model="/m", replicas=2, max_replicas=6, threads=2, replica_cpus=0.5)
    options = scaled.deployment_options()
    assert "num_replicas" not in options and options["ray_actor_options"] == {"num_cpus": 0.5}
    assert options["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 2.0,
    }
    with pytest.raises(ValueError, match=r"unknown fastonnx serve option\(s\) \['replica'\]"):
        ServeOptions.from_args({"model": "/m", "replica": "2"})
