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
