"""Vocabulary trimming on a tiny random BERT and a matching tokenizer: outputs equal for the
kept ids, dropped ids act as the unknown token, special tokens survive, and bad input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import tiny_tokenizer
from encoders import VOCAB
from onnx import TensorProto, helper
from tiny_tokenizer import token_states

from fastonnx.cli import main
from fastonnx.model_io import load_model
from fastonnx.passes.trim_vocab import TrimVocabError, coverage, trim_for_corpus, trim_vocab

transformers = pytest.importorskip("transformers")

CORPUS = ["the movie was very good", "but the plot was long and dull", "it is not a film"]


def make_tokenizer(tmp_path, size=VOCAB):
    return tiny_tokenizer.make_tokenizer(tmp_path, size)


def test_trimmed_model_equals_original_on_kept_ids(tiny_bert, tmp_path):
    tokenizer, _ = make_tokenizer(tmp_path)
    model = load_model(tiny_bert)
    report = trim_for_corpus(model, tokenizer, CORPUS)
    kept = set(report.kept.tolist())
    assert {
        tokenizer.convert_tokens_to_ids(t) for t in tiny_tokenizer.SPECIAL
    } <= kept  # specials survive
    used = {i for ids in tokenizer(CORPUS)["input_ids"] for i in ids}
    assert used <= kept and report.vocab_after == len(kept) < report.vocab_before == VOCAB
    assert report.params_after < report.params_before
    ids = np.array(tokenizer(CORPUS[:2], padding=True)["input_ids"], dtype=np.int64)
    np.testing.assert_array_equal(token_states(model, ids), token_states(tiny_bert, ids))
    assert coverage(report, tokenizer, CORPUS) == 1.0


def test_dropped_ids_act_as_the_unknown_token(tiny_bert, tmp_path):
    tokenizer, _ = make_tokenizer(tmp_path)
    model = load_model(tiny_bert)
    report = trim_for_corpus(model, tokenizer, CORPUS)
    dropped = [i for i in range(VOCAB) if i not in set(report.kept.tolist())][:5]
    ids = np.array([[2, *dropped, 3]], dtype=np.int64)
    as_unknown = np.where(np.isin(ids, dropped), tokenizer.unk_token_id, ids)
    np.testing.assert_array_equal(token_states(model, ids), token_states(tiny_bert, as_unknown))
    text = "the filler900 movie"  # one token out of the corpus' vocabulary
    assert coverage(report, tokenizer, [text]) == pytest.approx(4 / 5)  # [CLS] .. [SEP]


def test_bad_input_leaves_the_model_unchanged(tiny_bert, tmp_path):
    tokenizer, _ = make_tokenizer(tmp_path)
    small, _ = make_tokenizer(tmp_path, size=50)
    model = load_model(tiny_bert)
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(TrimVocabError, match="corpus is empty"):
        trim_for_corpus(model, tokenizer, [])
    with pytest.raises(TrimVocabError, match="50 tokens but the model's embedding has 1000"):
        trim_for_corpus(model, small, CORPUS)
    with pytest.raises(TrimVocabError, match="do not fit the model's vocabulary"):
        trim_vocab(model, [1, 5000], unknown_id=1)
    assert ir.to_proto(model).SerializeToString() == before


def _lookup_model(tied: bool) -> ir.Model:
    emb = helper.make_tensor("E", TensorProto.FLOAT, [10, 4], np.arange(40, dtype=np.float32))
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"])]
    out = "h"
    if tied:  # a masked-LM head reusing the embedding
        nodes.append(helper.make_node("Gemm", ["h", "E"], ["logits"], transB=1))
        out = "logits"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=[emb],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_tied_embeddings_and_missing_lookup_are_refused():
    with pytest.raises(TrimVocabError, match="also used by .*tied output"):
        trim_vocab(_lookup_model(tied=True), [0, 1], unknown_id=1)
    model = _lookup_model(tied=False)
    model.graph.inputs[0].name = "ids"  # not the token-id input
    with pytest.raises(TrimVocabError, match="no word-embedding lookup"):
        trim_vocab(model, [0, 1], unknown_id=1)
    report = trim_vocab(_lookup_model(tied=False), [3, 7], unknown_id=1)
    assert report.kept.tolist() == [1, 3, 7]


def test_cli_trims_and_verifies(tiny_bert, tmp_path, capsys):
    _, folder = make_tokenizer(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / "trimmed.onnx"
    args = ["optimize", str(tiny_bert), "-o", str(out), "--preset", "fuse", "--verify"]
    assert main([*args, "--trim-vocab", str(corpus), "--tokenizer", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "trim_vocab:" in printed and "1000 ->" in printed
    assert main(["optimize", str(tiny_bert), "-o", str(out), "--trim-vocab", str(corpus)]) == 2
    assert "--trim-vocab needs --tokenizer" in capsys.readouterr().err
