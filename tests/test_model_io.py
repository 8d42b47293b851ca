"""Loading (clear errors for unusable files) and atomic saving of ONNX models."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastonnx import model_io
from fastonnx.model_io import InputError, ModelLoadError, load_model, ort_session, save_model


def tiny_proto(ir_version: int = 10, opset: int = 17, k: int = 64) -> onnx.ModelProto:
    """y = x @ w, with a weight large enough (k x 8 floats) to go to external data."""
    w = np.arange(k * 8, dtype=np.float32).reshape(k, 8) / (k * 8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def write_external(proto: onnx.ModelProto, path) -> None:
    onnx.save_model(
        proto, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0
    )


def run_tiny(model: ir.Model) -> np.ndarray:
    with ort_session(model) as session:
        return session.run(None, {"x": np.ones((2, 64), np.float32)})[0]


EXPECTED = np.ones((2, 64), np.float32) @ (np.arange(512, dtype=np.float32).reshape(64, 8) / 512)


# --------------------------------------------------------------------------------------------
# Loading


def test_load_inline_and_external(tmp_path):
    inline = tmp_path / "inline.onnx"
    onnx.save_model(tiny_proto(), inline)
    external = tmp_path / "external.onnx"
    write_external(tiny_proto(), external)
    for path in (inline, external):
        model = load_model(path)
        np.testing.assert_allclose(run_tiny(model), EXPECTED, rtol=1e-6)
    assert model_io.external_data_files(external) == [(tmp_path / "external.onnx.data").resolve()]


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.onnx"
    data = tiny_proto().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated|not an ONNX model") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_missing_external_data(tmp_path):
    path = tmp_path / "model.onnx"
    write_external(tiny_proto(), path)
    os.remove(tmp_path / "model.onnx.data")
    with pytest.raises(ModelLoadError, match=r"missing external data file 'model\.onnx\.data'"):
        load_model(path)


def test_truncated_external_data(tmp_path):
    path = tmp_path / "model.onnx"
    write_external(tiny_proto(), path)
    data_file = tmp_path / "model.onnx.data"
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="is truncated: tensor 'w'"):
        load_model(path)


def test_unsupported_versions(tmp_path):
    max_ir, max_opset = model_io.ort_limits()
    assert max_ir >= 10 and max_opset >= 17  # what the exporters write today

    too_new_ir = tmp_path / "ir.onnx"
    onnx.save_model(tiny_proto(ir_version=max_ir + 1), too_new_ir)
    with pytest.raises(ModelLoadError, match=f"IR version {max_ir + 1}.*at most IR version"):
        load_model(too_new_ir)

    too_new_opset = tmp_path / "opset.onnx"
    proto = tiny_proto(opset=max_opset + 1)
    onnx.save_model(proto, too_new_opset)
    # onnx itself may not know that opset either; either way the error names it.
    with pytest.raises(ModelLoadError, match=f"opset {max_opset + 1}"):
        load_model(too_new_opset)


# --------------------------------------------------------------------------------------------
# Saving


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_roundtrip_inline_and_external(tmp_path):
    src = tmp_path / "src.onnx"
    write_external(tiny_proto(), src)
    model = load_model(src)

    out = save_model(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_allclose(run_tiny(load_model(out)), EXPECTED, rtol=1e-6)

    # A low threshold stands in for the 2 GiB one: the weights go to <name>.data.
    out = save_model(model, tmp_path / "ext.onnx", external_data_threshold=100)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 64 * 8 * 4
    reloaded = load_model(out)
    np.testing.assert_allclose(run_tiny(reloaded), EXPECTED, rtol=1e-6)
    assert _leftovers(tmp_path) == []


def test_save_memory_mapped_model(tmp_path):
    """A model whose tensors still point at the input's data file (as for > 2 GiB models)."""
    src = tmp_path / "src.onnx"
    write_external(tiny_proto(), src)
    mapped = ir.load(src)
    assert model_io.has_external_tensors(mapped)
    np.testing.assert_allclose(run_tiny(mapped), EXPECTED, rtol=1e-6)
    out = save_model(mapped, tmp_path / "sub.onnx", external_data=True)
    np.testing.assert_allclose(run_tiny(load_model(out)), EXPECTED, rtol=1e-6)


def test_never_overwrites_the_input(tmp_path):
    src = tmp_path / "src.onnx"
    # The input's data file is named as the data file of an output "w.onnx" would be.
    onnx.save_model(
        tiny_proto(), src, save_as_external_data=True, location="w.onnx.data", size_threshold=0
    )
    data = tmp_path / "w.onnx.data"
    before = src.read_bytes(), data.read_bytes()
    model = load_model(src)
    protect = [src, *model_io.external_data_files(src)]
    assert protect[1] == data.resolve()
    for dst in (src, tmp_path / "sub" / ".." / "src.onnx", tmp_path / "w.onnx"):
        with pytest.raises(InputError, match="refusing to write"):
            save_model(model, dst, protect=protect)
    assert (src.read_bytes(), data.read_bytes()) == before
    assert not (tmp_path / "w.onnx").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = load_model_from(tiny_proto(), tmp_path)
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"previous content")

    def broken_save(model, path, **kwargs):
        with open(path, "wb") as f:  # a partial file in the temporary folder...
            f.write(b"partial")
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, dst)
    assert dst.read_bytes() == b"previous content"  # the old file is untouched
    with pytest.raises(OSError):
        save_model(model, tmp_path / "new.onnx")
    assert not (tmp_path / "new.onnx").exists()
    assert not (tmp_path / "new.onnx.data").exists()
    assert _leftovers(tmp_path) == []


def test_save_errors(tmp_path):
    model = load_model_from(tiny_proto(), tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        save_model(model, tmp_path / "missing-folder" / "out.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        save_model(model, tmp_path / "folder.onnx")


def load_model_from(proto: onnx.ModelProto, folder) -> ir.Model:
    path = folder / "in.onnx"
    onnx.save_model(proto, path)
    return load_model(path)
