"""fastonnx: fast sparse INT8 transformer encoders on CPUs, inside ONNX Runtime.

The native kernels live in two artifacts built from ``custom_ops/``:

* ``libfastonnx_ops.so`` — the ORT custom-op library (domain ``com.fastonnx``), loadable by any
  ORT session through :func:`get_library_path`;
* ``fastonnx._native`` — a pybind11 module used to pack weights and to test kernels.
"""

from __future__ import annotations

from fastonnx._version import __version__
from fastonnx.runtime import OP_DOMAIN, get_library_path, make_session, session_options


def __getattr__(name: str):
    # Encoder is imported on first use: plain inference and `fastonnx info` do not need it.
    if name == "Encoder":
        from fastonnx.encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'fastonnx' has no attribute {name!r}")


def optimize(*args, **kwargs):
    """Optimize an encoder for ORT on CPUs; see :func:`fastonnx.optimizer.optimize`."""
    # Imported on first use: the optimizer pulls in onnxscript, which `fastonnx info` and
    # plain inference do not need.
    from fastonnx.optimizer import optimize as _optimize

    return _optimize(*args, **kwargs)


__all__ = [
    "Encoder",
    "OP_DOMAIN",
    "__version__",
    "get_library_path",
    "make_session",
    "optimize",
    "session_options",
]
