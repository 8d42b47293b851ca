"""A WordPiece tokenizer matching the tiny test encoders' vocabulary (encoders.VOCAB ids), and a
plain ORT run of an encoder on token ids: what the text-facing tests compare with."""

from __future__ import annotations

from pathlib import Path

from encoders import VOCAB

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "actor",
    "story",
    "is",
    "was",
    "not",
    "very",
    "good",
    "bad",
    "long",
    "dull",
    "and",
    "but",
    "it",
]


def token_states(model, ids):
    """First output of an encoder (path, bytes or onnx_ir model) on token ids [B, S], with an
    all-ones attention mask (and zero token types when the model takes them)."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.to_proto(model).SerializeToString()
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in {i.name for i in sess.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return sess.run(None, feeds)[0]


def make_tokenizer(folder: Path, size: int = VOCAB):
    """(tokenizer, folder) with `size` tokens: the specials, WORDS, then fillers."""
    import transformers

    tokens = SPECIAL + WORDS + [f"filler{i}" for i in range(size - len(SPECIAL) - len(WORDS))]
    folder = Path(folder) / f"tokenizer{size}"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n")
    transformers.BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder), folder
