"""Vocabulary trimming ("Load What You Need"): keep only the word embeddings a corpus uses.

Glossary: V vocabulary size, V' ids kept, D hidden size.

In a small encoder most weights are the token embeddings (all-MiniLM-L6-v2: 30,522 x 384 of its
22.7M parameters). Matched: the word-embedding lookup ``Gather(E [V, D], ids)`` whose ids are
the model input ``input_ids`` (directly or through a Cast). Rewritten to::

    Gather(E[kept] [V', D], Gather(remap [V], ids))

with ``remap[id]`` = the position of ``id`` among the kept ids, or of the unknown token for an id
that was not kept. The model's inputs stay the user's token ids, so the tokenizer is unchanged.
Refused, with the reason and the model unchanged: no such lookup; an embedding that is also used
elsewhere (tied masked-LM output weights); a tokenizer whose vocabulary does not match V.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


class TrimVocabError(ValueError):
    """The vocabulary cannot be trimmed; the message says why (the model is unchanged)."""


@dataclass
class TrimReport:
    embedding: str  # the initializer trimmed
    vocab_before: int
    vocab_after: int
    params_before: int  # every initializer element of the model
    params_after: int
    unknown_id: int
    kept: np.ndarray  # the ids kept, ascending

    def counts(self) -> dict[str, int]:
        return {"trimmed_embeddings": 1, "vocab_removed": self.vocab_before - self.vocab_after}

    def format(self) -> str:
        cut = 1 - self.params_after / self.params_before
        return (
            f"trim_vocab: {self.embedding} {self.vocab_before} -> {self.vocab_after} ids; "
            f"parameters {self.params_before:,} -> {self.params_after:,} (-{cut:.1%})"
        )


def _params(model: ir.Model) -> int:
    tensors = (v.const_value for v in model.graph.initializers.values())
    return sum(int(np.prod(t.shape.numpy())) for t in tensors if t is not None)


def _is_input_ids(value: ir.Value | None, graph: ir.Graph) -> bool:
    while value is not None and value.producer() is not None and value.producer().op_type == "Cast":
        value = value.producer().inputs[0]
    return value is not None and value in graph.inputs and value.name == "input_ids"


def find_word_embedding(model: ir.Model) -> tuple[ir.Node, ir.Value]:
    """The word-embedding Gather and its [V, D] initializer, or TrimVocabError saying why not."""
    graph = model.graph
    found = [
        n
        for n in graph
        if n.op_type == "Gather"
        and n.domain in ("", "ai.onnx")
        and n.inputs[0] is not None
        and n.inputs[0].const_value is not None
        and len(n.inputs[0].shape or ()) == 2
        and _is_input_ids(n.inputs[1], graph)
    ]
    if len(found) != 1:
        raise TrimVocabError(
            "no word-embedding lookup found (a Gather of a [V, D] initializer by the "
            "'input_ids' input)"
            if not found
            else f"{len(found)} Gathers read 'input_ids'; cannot tell the word embedding"
        )
    node = found[0]
    table = node.inputs[0]
    others = [u.node.name or u.node.op_type for u in table.uses() if u.node is not node]
    if others:
        raise TrimVocabError(
            f"the word embedding {table.name} is also used by {', '.join(others)} (tied output "
            "embeddings?): trimming it would change those outputs"
        )
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        raise TrimVocabError(f"the word-embedding Gather {node.name} does not gather axis 0")
    return node, table


def trim_vocab(model: ir.Model, keep_ids: Iterable[int], unknown_id: int) -> TrimReport:
    """Keeps the embeddings of ``keep_ids`` (the unknown token is always kept), in place."""
    node, table = find_word_embedding(model)
    emb = table.const_value.numpy()
    vocab = emb.shape[0]
    if not 0 <= unknown_id < vocab:
        raise TrimVocabError(f"unknown-token id {unknown_id} is not below the vocabulary {vocab}")
    kept = np.array(sorted({int(i) for i in keep_ids} | {unknown_id}), dtype=np.int64)
    if kept[0] < 0 or kept[-1] >= vocab:
        raise TrimVocabError(
            f"token ids {kept[0]}..{kept[-1]} do not fit the model's vocabulary of {vocab} "
            "(a tokenizer of another model?)"
        )
    before = _params(model)
    remap = np.full(vocab, np.searchsorted(kept, unknown_id), dtype=np.int64)
    remap[kept] = np.arange(len(kept))

    graph = model.graph
    new_table = ir.Value(name=f"{table.name}/trimmed", const_value=ir.tensor(emb[kept]))
    remap_value = ir.Value(name=f"{table.name}/remap", const_value=ir.tensor(remap))
    graph.register_initializer(new_table)
    graph.register_initializer(remap_value)
    remapped = ir.node("Gather", [remap_value, node.inputs[1]], name=f"{node.name}/remap")
    graph.insert_before(node, remapped)
    node.replace_input_with(0, new_table)
    node.replace_input_with(1, remapped.outputs[0])
    graph.initializers.pop(table.name)
    return TrimReport(table.name, vocab, len(kept), before, _params(model), unknown_id, kept)


# --------------------------------------------------------------------------------------------
# The ids a corpus uses


def corpus_ids(tokenizer, texts: Sequence[str], max_length: int = 512) -> Counter:
    """How often each token id occurs in ``texts`` tokenized as the model will see them."""
    counts: Counter = Counter()
    for start in range(0, len(texts), 256):
        batch = list(texts[start : start + 256])
        encoded = tokenizer(batch, truncation=True, max_length=max_length)
        for ids in encoded["input_ids"]:
            counts.update(ids)
    return counts


def trim_for_corpus(
    model: ir.Model, tokenizer, texts: Sequence[str], *, max_length: int = 512
) -> TrimReport:
    """Trims the model's vocabulary to the ids ``texts`` use plus the tokenizer's special tokens.

    Raises TrimVocabError for an empty corpus or a tokenizer that does not match the model."""
    if not texts:
        raise TrimVocabError("the corpus is empty")
    _, table = find_word_embedding(model)
    vocab = table.shape[0]
    if len(tokenizer) != vocab:
        raise TrimVocabError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} "
            "rows: not this model's tokenizer"
        )
    if tokenizer.unk_token_id is None:
        raise TrimVocabError("the tokenizer has no unknown token to map dropped ids to")
    keep = set(corpus_ids(tokenizer, texts, max_length)) | set(tokenizer.all_special_ids)
    return trim_vocab(model, keep, tokenizer.unk_token_id)


def coverage(report: TrimReport, tokenizer, texts: Sequence[str], max_length: int = 512) -> float:
    """Fraction of the tokens of ``texts`` the trimmed model keeps (the rest become unknown)."""
    counts = corpus_ids(tokenizer, texts, max_length)
    total = sum(counts.values())
    kept_ids = set(report.kept.tolist())
    kept = sum(c for i, c in counts.items() if i in kept_ids)
    return kept / total if total else 1.0
