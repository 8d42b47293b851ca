"""Atheris target: fastonnx's readers of untrusted files, on arbitrary bytes.

The first byte picks the reader (see make_corpus.py): ``b`` a packed weight (``_native``
weight_info / unpack_weight / Linear, then one run), ``m`` an ONNX model file
(``model_io.load_model``; a 32-byte ``w.data`` lies beside it for external-data references),
``n`` an ``.npz`` calibration file (``calibration.from_npz`` for a one-input model).

Expected outcomes are a result or the documented error type (ValueError from ``_native``,
``InputError`` from the Python readers); anything else (another exception, a crash, a hang) is a
finding. Run through scripts/fuzz.sh; see fuzz/README.md.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np
import onnx_ir as ir

from fastonnx import _native
from fastonnx.calibration import from_npz
from fastonnx.model_io import InputError, load_model

_WORK = Path(tempfile.mkdtemp(prefix="fastonnx-fuzz-"))
(_WORK / "w.data").write_bytes(bytes(32))
_MODEL = _WORK / "model.onnx"
_NPZ = _WORK / "calib.npz"


def _one_input_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", 8]))
    graph = ir.Graph([x], [x], nodes=[], name="g", opset_imports={"": 17})
    return ir.Model(graph, ir_version=10)


_NPZ_MODEL = _one_input_model()


def _blob(data: bytes) -> None:
    try:
        info = _native.weight_info(data)
    except ValueError:
        return
    w, scale, block = _native.unpack_weight(data)
    assert w.shape == (info["n"], info["k"]) and scale.shape == (info["n"],)
    assert tuple(block) == tuple(info["block_shape"])
    if info["n"] * info["k"] > 1 << 20:
        return  # the C++ target builds kernels on big shapes; keep this one fast
    lin = _native.Linear(data, "ref")
    x = np.linspace(-1, 1, 2 * info["k"], dtype=np.float32).reshape(2, info["k"])
    y = lin(x)
    assert y.shape == (2, info["n"])


def _model(data: bytes) -> None:
    _MODEL.write_bytes(data)
    with contextlib.suppress(InputError):
        load_model(_MODEL)


def _npz(data: bytes) -> None:
    _NPZ.write_bytes(data)
    with contextlib.suppress(InputError):
        from_npz(_NPZ, _NPZ_MODEL)


_TARGETS = {ord("b"): _blob, ord("m"): _model, ord("n"): _npz}


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target = _TARGETS.get(data[0], _blob)
    target(bytes(data[1:]))


def _instrument_fastonnx() -> None:
    # Coverage of fastonnx's own Python only: numpy and onnx are off target (and slow to
    # instrument), the C++ reader has its own libFuzzer target. instrument_imports() cannot see
    # through the editable install's import hook, so the loaded functions are patched in place.
    import types

    seen: set[int] = set()

    def visit(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            if obj.__module__ and obj.__module__.startswith("fastonnx"):
                atheris.instrument_func(obj)
        elif isinstance(obj, type) and obj.__module__.startswith("fastonnx"):
            for value in vars(obj).values():
                visit(getattr(value, "__func__", value))

    for name, module in list(sys.modules.items()):
        if name == "fastonnx" or name.startswith("fastonnx."):
            for value in list(vars(module).values()):
                visit(value)


def main() -> None:
    # Import what the readers load lazily, so it is instrumented too.
    import fastonnx.model_io as model_io

    model_io.ort_limits()
    _instrument_fastonnx()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
