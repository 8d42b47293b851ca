"""The HTTP JSON contract of ``fastonnx serve``, independent of any server framework.

Request (POST ``/`` or ``/encode``)::

    {"texts": ["a sentence", "another"]}

Response 200, an embedding model::

    {"embeddings": [[...], [...]], "dim": D}

a classifier::

    {"labels": [1, 0], "logits": [[...], [...]]}

Errors are ``{"error": {"kind": KIND, "message": ...}}`` with status 400 (``bad_json``,
``bad_request``: not an object, unknown keys, ``texts`` not a non-empty list of strings),
413 (``too_large``: the body, the number of texts or one text over its limit), 404/405 (routes)
and 500 (``internal``). Limits are checked before anything is allocated for the texts: the body
size before parsing, then the count and each text's length. A text within the character limit
but longer than the model's token maximum is truncated (as ``fastonnx.Encoder`` documents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from fastonnx.serving.backend import LOGITS, TextModel

DEFAULT_MAX_TEXTS = 256
DEFAULT_MAX_TEXT_CHARS = 10_000
DEFAULT_MAX_BODY_BYTES = 4 << 20
ENCODE_PATHS = ("/", "/encode")
HEALTH_PATH = "/health"
_KEYS = ("texts",)


@dataclass
class Response:
    status: int
    body: dict

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


class RequestError(Exception):
    """A request the handler refuses: HTTP ``status``, an error ``kind`` and a message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def response(self) -> Response:
        return error_response(self.status, self.kind, self.message)


def error_response(status: int, kind: str, message: str) -> Response:
    return Response(status, {"error": {"kind": kind, "message": message}})


class RequestHandler:
    """Parses and bounds requests, calls the model, shapes the JSON answer.

    ``parse`` and ``answer`` are separate so a server can batch: parse each request, run the
    texts of several requests through ``model`` at once (``answer_many``), split the answers.
    """

    def __init__(
        self,
        model: TextModel,
        *,
        max_texts: int = DEFAULT_MAX_TEXTS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        for name, value in (
            ("max_texts", max_texts),
            ("max_text_chars", max_text_chars),
            ("max_body_bytes", max_body_bytes),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars
        self.max_body_bytes = max_body_bytes

    # -- parsing --------------------------------------------------------------------------

    def check_body_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise RequestError(413, "too_large", f"request body over {self.max_body_bytes} bytes")

    def parse(self, body: bytes) -> list[str]:
        """The request's texts, or RequestError naming what is wrong."""
        self.check_body_size(len(body))
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RequestError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise RequestError(
                400,
                "bad_request",
                f'expected an object {{"texts": [...]}}, got a {_json_type(request)}',
            )
        unknown = sorted(set(request) - set(_KEYS))
        if unknown:
            raise RequestError(
                400, "bad_request", f"unknown key(s) {unknown}; the request takes {list(_KEYS)}"
            )
        if "texts" not in request:
            raise RequestError(400, "bad_request", 'missing "texts" (a list of strings)')
        texts = request["texts"]
        if not isinstance(texts, list):
            raise RequestError(
                400, "bad_request", f'"texts" must be a list of strings, got a {_json_type(texts)}'
            )
        if not texts:
            raise RequestError(400, "bad_request", '"texts" is empty')
        if len(texts) > self.max_texts:
            raise RequestError(
                413, "too_large", f"{len(texts)} texts; at most {self.max_texts} per request"
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(
                    400, "bad_request", f"texts[{i}] is a {_json_type(text)}, not a string"
                )
            if len(text) > self.max_text_chars:
                raise RequestError(
                    413,
                    "too_large",
                    f"texts[{i}] has {len(text)} characters; at most {self.max_text_chars}",
                )
        return texts

    # -- answering ------------------------------------------------------------------------

    def _shape(self, rows: np.ndarray) -> dict:
        if self.model.kind == LOGITS:
            return {"labels": rows.argmax(axis=-1).tolist(), "logits": rows.tolist()}
        return {"embeddings": rows.tolist(), "dim": int(rows.shape[-1])}

    def answer_many(self, requests: list[list[str]]) -> list[dict]:
        """The answers of several parsed requests, from one model call on all their texts."""
        flat = [t for texts in requests for t in texts]
        rows = self.model.run(flat)
        if len(rows) != len(flat):
            raise RuntimeError(f"the model gave {len(rows)} rows for {len(flat)} texts")
        answers, start = [], 0
        for texts in requests:
            answers.append(self._shape(rows[start : start + len(texts)]))
            start += len(texts)
        return answers

    def handle_encode(self, body: bytes) -> Response:
        """One request end to end (no batching across requests)."""
        try:
            texts = self.parse(body)
        except RequestError as exc:
            return exc.response()
        try:
            return Response(200, self.answer_many([texts])[0])
        except Exception as exc:  # noqa: BLE001 - the model failed: a 500, not a dropped request
            return internal_error(exc)

    def health(self) -> Response:
        return Response(200, {"status": "ok", **self.model.info()})

    def route(self, method: str, path: str) -> str | Response:
        """The route name ("encode" or "health"), else the 404/405 response."""
        path = path.rstrip("/") or "/"
        if path == HEALTH_PATH:
            return "health" if method in ("GET", "HEAD") else _not_allowed(method, path, "GET")
        if path in ENCODE_PATHS:
            return "encode" if method == "POST" else _not_allowed(method, path, "POST")
        return error_response(
            404, "not_found", f"no route {path}; POST / or /encode, GET {HEALTH_PATH}"
        )


def internal_error(exc: BaseException) -> Response:
    return error_response(500, "internal", f"{type(exc).__name__}: {exc}")


def _not_allowed(method: str, path: str, allowed: str) -> Response:
    return error_response(405, "method_not_allowed", f"{method} {path}: use {allowed}")


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)
