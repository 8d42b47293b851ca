"""Shared pytest configuration. Fixtures that only one test module needs live in that module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ is not a package; make its helper modules (encoders.py) importable from test modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def encoder_exports(tmp_path_factory):
    """Exports of the tiny test encoders, each combination exported once per session.

    Shared by test_fusion.py and test_export.py: exporting is the slow part of both.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from encoders import ExportCache

    return ExportCache(tmp_path_factory.mktemp("encoder_exports"))


@pytest.fixture(scope="session")
def tiny_bert(encoder_exports) -> Path:
    """A 2-layer random BERT exported with the dynamo exporter (weights in external data)."""
    from encoders import Combo

    return encoder_exports.get(Combo("bert", "sdpa", "dynamo")).path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """(tokenizer, folder) matching tiny_bert's vocabulary."""
    pytest.importorskip("transformers")
    import tiny_tokenizer

    return tiny_tokenizer.make_tokenizer(tmp_path_factory.mktemp("tok"))
