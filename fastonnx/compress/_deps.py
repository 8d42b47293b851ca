"""Lazy access to the ``[train]`` extra (torch, transformers).

``import fastonnx.compress`` must work on an inference-only install, so nothing here is imported
at module level; a function that needs torch calls :func:`require_torch` and fails there, with
the install command in the message.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_HINT = "pip install 'fastonnx[train]'"


def _require(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # the package is there but broken: show the real error
            raise
        raise ImportError(f"{what} needs {module}, which is not installed: {_HINT}") from exc


def require_torch(what: str = "fastonnx.compress") -> ModuleType:
    return _require("torch", what)


def require_transformers(what: str = "fastonnx.compress") -> ModuleType:
    return _require("transformers", what)
