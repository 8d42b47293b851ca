"""What a server calls: texts in, embeddings or classifier logits out, for both model kinds.

* a token-id model (``input_ids`` ...) with a Hugging Face tokenizer folder: ``fastonnx.Encoder``
  (length-sorted batches, truncation, pooling as the folder's sentence-transformers config);
* a model with the tokenizer inside (``fastonnx package``: one string tensor [1] in): one ORT run
  per text, with onnxruntime-extensions' and fastonnx's custom-op libraries registered.

Either way one ORT session per ``TextModel``, shared by the threads that call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDINGS = "embeddings"
LOGITS = "logits"


class BackendError(ValueError):
    """The model (or its tokenizer) cannot be served; the message says why."""


@dataclass
class TextModel:
    """``run(texts)`` -> float32 [len(texts), D]; ``kind`` says whether rows are embeddings or
    logits (a classifier: the server adds the argmax labels)."""

    path: str
    kind: str
    tokenizer_inside: bool
    _run: object
    dim: int | None = None

    def run(self, texts: list[str]) -> np.ndarray:
        return self._run(texts)

    def info(self) -> dict:
        return {
            "model": Path(self.path).name,
            "output": self.kind,
            "dim": self.dim,
            "tokenizer_inside": self.tokenizer_inside,
        }


def string_input(model_path: str | os.PathLike) -> str | None:
    """The name of the model's string input (a tokenizer-inside model), else None."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    for value in proto.graph.input:
        if value.type.tensor_type.elem_type == onnx.TensorProto.STRING:
            return value.name
    return None


def _packaged(path: str, input_name: str, threads: int | None) -> TextModel:
    import onnxruntime as ort

    from fastonnx.runtime import session_options

    try:
        import onnxruntime_extensions as ortx
    except ImportError as exc:
        raise BackendError(
            f"{path} has the tokenizer inside: it needs onnxruntime-extensions "
            "(pip install 'fastonnx[serve]')"
        ) from exc
    so = session_options(threads)
    so.register_custom_ops_library(ortx.get_library_path())
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = session.get_outputs()[0]
    dim = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
    # `fastonnx package` names pooled outputs sentence_embedding and keeps a classifier's own.
    kind = EMBEDDINGS if out.name.endswith("sentence_embedding") else LOGITS
    if kind == LOGITS and (len(out.shape) != 2 or dim is None or dim > 16):
        kind = EMBEDDINGS  # the same rule as Encoder.is_classifier

    def run(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, dim or 0), dtype=np.float32)
        # The extensions' tokenizer reads several strings as one pair: one text per run.
        rows = [session.run(None, {input_name: np.array([t])})[0][0] for t in texts]
        return np.stack(rows).astype(np.float32)

    return TextModel(path, kind, True, run, dim)


def load_text_model(
    model: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
) -> TextModel:
    """A ``TextModel`` for ``model``; ``tokenizer`` (a Hugging Face folder) is required unless
    the tokenizer is inside the model, and then must not be given. ``max_length``: tokens kept
    per text (default: the tokenizer's maximum, at most 512; a packaged model has its own)."""
    path = Path(model)
    if not path.is_file():
        raise BackendError(f"model {path} does not exist")
    path = str(path.resolve())
    try:
        text_input = string_input(path)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
        raise BackendError(f"{path} is not an ONNX model: {exc}") from exc
    if text_input is not None:
        if max_length is not None:
            raise BackendError(
                f"{path} has the tokenizer inside: its truncation is fixed in the graph "
                "(fastonnx package --max-length); give no max_length"
            )
        if tokenizer is not None:
            raise BackendError(
                f"{path} has the tokenizer inside (string input '{text_input}'): "
                "give no --tokenizer"
            )
        return _packaged(path, text_input, threads)
    if tokenizer is None:
        raise BackendError(
            f"{path} takes token ids: give the Hugging Face tokenizer folder (--tokenizer DIR), "
            "or put the tokenizer inside with `fastonnx package`"
        )
    from fastonnx.calibration import CalibrationError
    from fastonnx.encoder import Encoder, EncoderError

    try:
        enc = Encoder(path, tokenizer, threads=threads, max_length=max_length)
    except (CalibrationError, EncoderError) as exc:
        raise BackendError(str(exc)) from exc
    last = enc.session.get_outputs()[0].shape[-1]
    dim = last if isinstance(last, int) else None
    if enc.is_classifier:
        return TextModel(path, LOGITS, False, lambda t: enc.predict_logits(t, batch_size), dim)
    return TextModel(path, EMBEDDINGS, False, lambda t: enc.encode(t, batch_size), dim)
