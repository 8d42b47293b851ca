"""A WordPiece tokenizer matching the tiny test encoders' vocabulary (encoders.VOCAB ids)."""

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
