"""Strings in, vectors or labels out: a small encoder API over an ONNX model.

In the habits of sentence-transformers and Optimum::

    from fastonnx import Encoder
    enc = Encoder("model.fast.onnx", tokenizer="path/to/hf-model-folder", threads=2)
    vectors = enc.encode(["a sentence", "another"], batch_size=32)   # [n, D], pooled
    labels = enc.predict(["great film", "dull plot"])                # classifiers: [n] ids

Texts are sorted by length and batched, so each batch is padded only to its own longest text
(and tokenized while the batch before runs); results come back in the input order. Texts
longer than ``max_length`` tokens (default: the tokenizer's model maximum, at most 512, and no
more than the model's position embeddings) are truncated. Pooling for token-state
outputs follows the sentence-transformers configuration in the tokenizer folder
(``1_Pooling/config.json``: mean or CLS; ``modules.json``: a Normalize step), else mean pooling
without normalization. One ORT session serves every thread (ORT sessions are thread-safe);
tokenization, which mutates the tokenizer's truncation state, is serialized by a lock.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_MAX_LENGTH_CAP = 512


class EncoderError(ValueError):
    """Bad input to the encoder: the message names what is wrong."""


def pooling_config(folder: str | os.PathLike | None) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers folder; ("mean", False) otherwise."""
    pooling, normalize = "mean", False
    if folder is None:
        return pooling, normalize
    folder = Path(folder)
    config = folder / "1_Pooling" / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    return pooling, normalize


def default_max_length(tokenizer, folder: str | os.PathLike | None) -> int:
    """Token budget per text: the tokenizer's model maximum (at most 512), and no more than the
    position embeddings of the model in ``folder`` (its config.json) can take, so long texts are
    truncated rather than failing inside the model. RoBERTa-style models number positions from
    pad_token_id + 1."""
    limit = getattr(tokenizer, "model_max_length", _MAX_LENGTH_CAP) or _MAX_LENGTH_CAP
    limit = min(int(limit), _MAX_LENGTH_CAP)
    config = Path(folder) / "config.json" if folder is not None else None
    if config is not None and config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError):
            return limit
        positions = cfg.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            if cfg.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
                positions -= int(cfg.get("pad_token_id") or 1) + 1
            limit = min(limit, max(positions, 2))
    return limit


class Encoder:
    """An ONNX encoder with its tokenizer; see the module docstring.

    ``model``: an .onnx path (fastonnx-optimized or not; fastonnx's ops are registered when the
    library is available). ``tokenizer``: a Hugging Face tokenizer folder or object.
    ``pooling``: "mean", "cls" or None (from the folder's sentence-transformers config).
    ``normalize``: L2-normalize embeddings (None: from the config). ``threads``: ORT intra-op
    threads (None: ORT's default).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        threads: int | None = None,
        max_length: int | None = None,
    ) -> None:
        import onnxruntime as ort

        from fastonnx.runtime import session_options

        folder = None
        if isinstance(tokenizer, str | os.PathLike):
            from fastonnx.calibration import load_tokenizer

            folder = Path(tokenizer)
            tokenizer = load_tokenizer(folder)
        self.tokenizer = tokenizer
        cfg_pooling, cfg_normalize = pooling_config(folder)
        self.pooling = pooling or cfg_pooling
        if self.pooling not in ("mean", "cls"):
            raise EncoderError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        self.normalize = cfg_normalize if normalize is None else normalize
        self.max_length = max_length or default_max_length(tokenizer, folder)
        so = session_options(threads)
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in self.input_names:
            raise EncoderError(
                f"{model}: the model has no 'input_ids' input (it takes {self.input_names})"
            )
        out = self.session.get_outputs()[0]
        self._rank = len(out.shape)
        self._dim = out.shape[-1] if isinstance(out.shape[-1], int) else 0
        self._lock = threading.Lock()

    @property
    def is_classifier(self) -> bool:
        """True when the first output is [batch, classes] logits rather than token states."""
        return self._rank == 2 and not self.normalize and self._dim <= 16

    # ----------------------------------------------------------------------------------------

    def _check(self, texts) -> list[str]:
        if isinstance(texts, str):
            raise EncoderError("texts must be a list of strings, not one string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise EncoderError(f"texts[{i}] is a {type(t).__name__}, not a string")
        return texts

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        with self._lock:
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def _feeds(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        pad = self.tokenizer.pad_token_id or 0
        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def _batches(self, texts: list[str], batch_size: int):
        """(positions, feeds) per batch, longest texts first, each padded to its own longest.

        Texts are ordered by character length (a close proxy for token length) so each batch
        can be tokenized on a helper thread while the session runs the one before: the Rust
        tokenizer and ORT both release the GIL."""
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._tokenize, [texts[i] for i in chunks[0]]) if chunks else None
            for k, pos in enumerate(chunks):
                ids = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(self._tokenize, [texts[i] for i in chunks[k + 1]])
                yield pos, self._feeds(ids)

    def _run(self, texts, batch_size: int, show_progress_bar: bool, fn) -> np.ndarray:
        texts = self._check(texts)
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        results: list[np.ndarray | None] = [None] * len(texts)
        done = 0
        for pos, feeds in self._batches(texts, batch_size):
            out = fn(self.session.run(None, feeds)[0], feeds["attention_mask"])
            for row, i in enumerate(pos):
                results[i] = out[row]
            done += len(pos)
            if show_progress_bar:
                print(f"\rencoded {done}/{len(texts)}", end="", file=sys.stderr, flush=True)
        if show_progress_bar:
            print(file=sys.stderr)
        return np.stack(results)

    def _pool(self, out: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if out.ndim == 3:  # token states [B, S, D]
            if self.pooling == "cls":
                out = out[:, 0]
            else:
                # The masked sum as a batched [1, S] x [S, D] product: no [B, S, D] temporary.
                m = mask.astype(out.dtype)[:, None, :]
                out = (m @ out)[:, 0, :] / np.maximum(m.sum(axis=2), 1)
        if self.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, show_progress_bar: bool = False
    ) -> np.ndarray:
        """Pooled embeddings [len(texts), D] (float32), in the input order."""
        return self._run(texts, batch_size, show_progress_bar, self._pool)

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """A classifier's logits [len(texts), classes]."""
        return self._run(texts, batch_size, False, lambda out, _mask: out.astype(np.float32))

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """A classifier's predicted class ids [len(texts)]."""
        logits = self.predict_logits(texts, batch_size)
        return logits.argmax(axis=-1) if len(logits) else np.zeros(0, dtype=np.int64)

    def __call__(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``predict`` for classifiers, ``encode`` otherwise."""
        if self.is_classifier:
            return self.predict(texts, batch_size)
        return self.encode(texts, batch_size)
