"""Loading fastonnx's custom-op library into ONNX Runtime sessions."""

from __future__ import annotations

import os
from pathlib import Path

OP_DOMAIN = "com.fastonnx"
_LIBRARY_NAME = "libfastonnx_ops.so"


def get_library_path() -> str:
    """Path of the ORT custom-op library, for ``SessionOptions.register_custom_ops_library``."""
    # The library is installed beside the pybind11 module; locating it through that module
    # works for wheels and editable installs alike.
    from fastonnx import _native

    path = Path(_native.__file__).with_name(_LIBRARY_NAME)
    if not path.is_file():
        raise FileNotFoundError(
            f"fastonnx custom-op library not found at {path}; reinstall fastonnx (pip install .)"
        )
    return str(path)


def session_options(intra_op_num_threads: int | None = None, **config: str):
    """ORT ``SessionOptions`` with fastonnx's operators registered.

    ``config`` entries are passed to ``add_session_config_entry``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = intra_op_num_threads
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return so


def make_session(model: str | os.PathLike | bytes, intra_op_num_threads: int | None = None):
    """An ORT ``InferenceSession`` on the CPU with fastonnx's operators registered."""
    import onnxruntime as ort

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    so = session_options(intra_op_num_threads)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
