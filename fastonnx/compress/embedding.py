"""Embedding models (sentence-transformers style): the pooled sentence vector as the distilled
output, and the cosine between teacher and student vectors as the metric.

Glossary: B batch, S tokens, D hidden size. The pooling follows the folder's
``1_Pooling/config.json`` when there is one (mean of the token vectors over the attention mask,
or the [CLS] vector); mean pooling otherwise, the sentence-transformers default. Normalization
does not change a cosine, so it is not applied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastonnx.compress._deps import require_torch

POOLINGS = ("mean", "cls")


def pooling_of(folder: Path) -> str:
    """``"mean"`` or ``"cls"`` from a sentence-transformers folder (mean when unsaid)."""
    config = Path(folder) / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    settings = json.loads(config.read_text(encoding="utf-8"))
    if settings.get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """[B, S, D] token vectors -> [B, D] sentence vectors (torch tensors or NumPy arrays)."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask[..., None].astype(hidden.dtype) if isinstance(hidden, np.ndarray) else None
    if weights is None:
        weights = mask[..., None].to(hidden.dtype)
    total = (hidden * weights).sum(1)
    count = weights.sum(1)
    if isinstance(hidden, np.ndarray):
        return total / np.maximum(count, 1e-9)
    return total / count.clamp(min=1e-9)


def _wrapper_class():
    torch = require_torch()

    class PooledEncoder(torch.nn.Module):
        """An encoder whose output ``logits`` is the pooled sentence vector [B, D] (the
        distillation loss reads ``logits`` and ``hidden_states``)."""

        def __init__(self, encoder: Any, pooling: str) -> None:
            super().__init__()
            self.encoder = encoder
            self.pooling = pooling

        def forward(self, input_ids, attention_mask, output_hidden_states=False, **kwargs):
            from types import SimpleNamespace

            out = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
            vectors = pool(out.last_hidden_state, attention_mask, self.pooling)
            return SimpleNamespace(logits=vectors, hidden_states=out.hidden_states)

    return PooledEncoder


def pooled(encoder: Any, pooling: str) -> Any:
    return _wrapper_class()(encoder, pooling)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [B, D] arrays."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def torch_vectors(model: Any, batches: Sequence[dict[str, Any]]) -> np.ndarray:
    """Sentence vectors of a :func:`pooled` model over batches, as one [N, D] array."""
    torch = require_torch()
    model.eval()
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out.append(model(**inputs).logits.float().numpy())
    return np.concatenate(out)


def onnx_vectors(
    path: Path, tokenizer: Any, texts: Sequence[str], max_len: int, pooling: str, fast: bool
) -> np.ndarray:
    """Sentence vectors of an ONNX encoder (output ``last_hidden_state``), pooled here."""
    import onnxruntime as ort

    import fastonnx

    if fast:
        session = fastonnx.make_session(path, 1)
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = []
    for start in range(0, len(texts), 32):
        encoded = tokenizer(
            list(texts[start : start + 32]),
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        feed = {n: encoded[n].astype(np.int64) for n in names}
        hidden = session.run(["last_hidden_state"], feed)[0]
        out.append(pool(hidden, encoded["attention_mask"], pooling))
    return np.concatenate(out)
