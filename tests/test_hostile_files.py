"""Hostile and broken files (issue 10): external data that points out of the model's folder,
bad calibration files, models ORT cannot run, signals during save, a bad FASTONNX_ISA.

Every bad input to the CLI exits 2 with one line naming the problem (exit 1 is only "verify
beyond tolerance"); the Python API raises ``InputError`` with the same line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastonnx.cli import main
from fastonnx.model_io import InputError, ModelLoadError, as_model, load_model
from fastonnx.optimizer import optimize

REPO = Path(__file__).resolve().parents[1]


def add_model(ir_version: int = 10) -> onnx.ModelProto:
    """y = x + b, b a 1 KiB initializer (big enough to go to external data)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 256])],
        [numpy_helper.from_array(np.arange(256, dtype=np.float32), "b")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version
    )


def encoder_model(custom_op: bool = False) -> onnx.ModelProto:
    """The smallest graph the optimizer treats as an encoder: MatMul + Add + LayerNorm,
    optionally followed by an op from a domain ORT does not know."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["h2"]),
        helper.make_node("LayerNormalization", ["h2", "g", "beta"], ["ln"], axis=-1),
        helper.make_node("Mystery", ["ln"], ["y"], domain="com.example")
        if custom_op
        else helper.make_node("Identity", ["ln"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(64, np.float32), "b"),
        numpy_helper.from_array(np.ones(64, np.float32), "g"),
        numpy_helper.from_array(np.zeros(64, np.float32), "beta"),
    ]
    graph = helper.make_graph(
        nodes,
        "enc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 64])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17)]
    if custom_op:
        opsets.append(helper.make_opsetid("com.example", 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def with_location(path: Path, location: str) -> None:
    """Writes add_model() to `path` with its weight in external data at `location` (as given,
    not checked: what a hostile model file holds)."""
    proto = add_model()
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "1024")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(proto.SerializeToString())


def optimize_cli(*args) -> int:
    return main(["optimize", *map(str, args)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fastonnx optimize: error: "), err
    return err[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# External data only inside the model's folder (finding 3)


@pytest.fixture
def layout(tmp_path):
    """models/ holds the model; secret.data beside it (outside the folder) holds 1 KiB."""
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret.data").write_bytes(b"S" * 1024)
    return models


def _hostile_locations(models: Path) -> dict[str, tuple[str, str]]:
    """name -> (location, expected message), for a target that exists and one that does not."""
    secret = str(models.parent / "secret.data")
    (models / "link.data").symlink_to(models.parent / "secret.data")
    (models / "dangling.data").symlink_to(models.parent / "absent.data")
    (models / "sub").symlink_to(models.parent)
    return {
        "dotdot": ("../secret.data", "contains '..'"),
        "dotdot-absent": ("../absent.data", "contains '..'"),
        "deep-dotdot": ("a/../../secret.data", "contains '..'"),
        "backslash-dotdot": ("..\\secret.data", "contains '..'"),
        "absolute": (secret, "is an absolute path"),
        "absolute-absent": (str(models.parent / "absent.data"), "is an absolute path"),
        "etc-passwd": ("/etc/passwd", "is an absolute path"),
        "drive": ("C:/secret.data", "is an absolute path"),
        "symlink": ("link.data", "leads out of the model's folder"),
        "dangling-symlink": ("dangling.data", "leads out of the model's folder"),
        "symlinked-folder": ("sub/secret.data", "leads out of the model's folder"),
        "empty": ("", "is empty"),
        "folder-itself": (".", "leads out of the model's folder"),
    }


def test_external_data_outside_the_folder_is_refused_everywhere(layout, tmp_path, capsys):
    for name, (location, message) in _hostile_locations(layout).items():
        model = layout / f"{name}.onnx"
        with_location(model, location)
        with pytest.raises(ModelLoadError, match=message):
            load_model(model)
        with pytest.raises(ModelLoadError, match=message):
            optimize(model, preset="fuse")
        # In memory there is no folder: text problems are named, anything else has no folder.
        lexical = message in ("contains '..'", "is an absolute path", "is empty")
        with pytest.raises(ModelLoadError, match=message if lexical else "given in memory"):
            optimize(onnx.load(model, load_external_data=False), preset="fuse")
        out = tmp_path / f"{name}.out.onnx"
        assert optimize_cli(model, "-o", out, "--preset", "fuse") == 2, name
        assert message in one_error_line(capsys), name
        assert not out.exists()


def test_messages_do_not_tell_whether_an_outside_file_exists(layout):
    def message(location: str) -> str:
        model = layout / "m.onnx"
        with_location(model, location)
        with pytest.raises(ModelLoadError) as info:
            load_model(model)
        return str(info.value).replace(location, "<loc>")

    assert message("../secret.data") == message("../absent.data")
    assert message(str(layout.parent / "secret.data")) == message(str(layout.parent / "x.data"))
    (layout / "a.data").symlink_to(layout.parent / "secret.data")
    (layout / "b.data").symlink_to(layout.parent / "absent.data")
    assert message("a.data") == message("b.data")


def test_external_data_inside_the_folder_still_loads(layout):
    (layout / "data").mkdir()
    (layout / "data" / "w.data").write_bytes(np.arange(256, dtype=np.float32).tobytes())
    # (A symbolic link even inside the folder is refused, by onnx's checker.)
    for location in ("data/w.data", "./data/w.data"):
        model = layout / "ok.onnx"
        with_location(model, location)
        loaded = load_model(model)
        b = loaded.graph.initializers["b"].const_value.numpy()
        np.testing.assert_array_equal(b, np.arange(256, dtype=np.float32))


def test_in_memory_model_with_external_data_is_not_resolved_against_the_cwd(layout, monkeypatch):
    # A proto loaded without its data has no folder; the working directory holds a file at
    # the location, and it must not be read.
    (layout / "w.data").write_bytes(b"\0" * 1024)
    model = layout / "m.onnx"
    with_location(model, "w.data")
    monkeypatch.chdir(layout)
    proto = onnx.load(model, load_external_data=False)
    with pytest.raises(ModelLoadError, match="given in memory, with no folder"):
        optimize(proto, preset="fuse")
    # The same as an onnx_ir model with no base folder.
    with pytest.raises(ModelLoadError, match="no folder"):
        as_model(ir.serde.deserialize_model(proto))
    # With the data loaded (onnx.load's default), a proto is fine.
    assert as_model(onnx.load(model)).graph.initializers["b"].const_value.numpy().size == 256


def test_onnx_ir_model_pointing_out_of_its_folder(layout):
    model = layout / "m.onnx"
    with_location(model, "../secret.data")
    proto = onnx.load(model, load_external_data=False)
    # Bypass the proto check to get an ir.Model whose tensor points out of its folder.
    hostile = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(hostile.graph, layout)
    with pytest.raises(ModelLoadError, match="contains '..'"):
        optimize(hostile, preset="fuse")


# --------------------------------------------------------------------------------------------
# com.fastonnx nodes: unknown attributes and opsets (finding 6)


def _fastonnx_node_model(attrs: dict, opset: int = 1) -> onnx.ModelProto:
    node = helper.make_node("SparseLinear", ["x", "w"], ["y"], domain="com.fastonnx", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])],
        [numpy_helper.from_array(np.zeros(4, np.uint8), "w")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.fastonnx", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


@pytest.mark.parametrize(
    ("attrs", "opset", "message"),
    [
        ({"activaton": "gelu"}, 1, "unknown attribute\\(s\\) activaton \\(it takes: activation\\)"),
        ({"activation": "gelu", "alpha": 1.0}, 1, "unknown attribute\\(s\\) alpha"),
        ({}, 2, "imports com.fastonnx opset 2; this fastonnx has opset 1 only"),
    ],
)
def test_fastonnx_nodes_are_checked_at_load(tmp_path, attrs, opset, message):
    proto = _fastonnx_node_model(attrs, opset)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
    with pytest.raises(ModelLoadError, match=message):
        as_model(proto)


# --------------------------------------------------------------------------------------------
# CLI: exit 2 and one line for every bad input (findings 5, 7)


def test_unknown_custom_op_with_int8_preset(tmp_path, capsys):
    src = tmp_path / "enc.onnx"
    onnx.save(encoder_model(custom_op=True), src)
    out = tmp_path / "out.onnx"
    assert optimize_cli(src, "-o", out, "--preset", "int8") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("fastonnx optimize: error: ONNX Runtime cannot load the model")
    assert "com.example:Mystery" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_unknown_custom_op_with_verify(tmp_path, capsys):
    src = tmp_path / "enc.onnx"
    onnx.save(encoder_model(custom_op=True), src)
    assert optimize_cli(src, "-o", tmp_path / "o.onnx", "--preset", "fuse", "--verify") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ONNX Runtime cannot load the reference model" in line and "Mystery" in line


@pytest.fixture
def encoder_file(tmp_path) -> Path:
    src = tmp_path / "enc.onnx"
    onnx.save(encoder_model(), src)
    return src


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_calibration_with_sequence_length_0(encoder_file, tmp_path, capsys, verify):
    npz = _npz(tmp_path / "seq0.npz", x=np.zeros((4, 0, 64), np.float32))
    out = tmp_path / "out.onnx"
    extra = ["--verify"] if verify else []
    assert (
        optimize_cli(encoder_file, "-o", out, "--preset", "int8", "--calibration", npz, *extra) == 2
    )
    assert "input 'x' has shape [1, 0, 64], empty along axis 1" in one_error_line(capsys)
    assert not out.exists()


def _zip_with_raw_member(path: Path) -> None:
    """A zip like an .npz whose member lacks the .npy suffix (found by fuzzing)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("input_ids", b"1 2 3")


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: np.save(p, np.zeros((2, 3))), "a .npy file (one array), not an .npz archive"),
        (lambda p: p.write_text("input_ids\n1 2 3\n"), "not an .npz file (an .npz is a zip"),
        (lambda p: p.write_bytes(b""), "not an .npz file"),
        (lambda p: np.savez(p, x=np.array([{"a": 1}], dtype=object)), "object array"),
        (lambda p: np.savez(p, x=np.array([["a", "b"]])), "input 'x' is <U1; numeric arrays"),
        (lambda p: p.mkdir(), "not a file"),
        (_zip_with_raw_member, "member 'input_ids' is not a .npy array"),
    ],
    ids=["npy", "text", "empty", "pickle", "strings", "folder", "raw-member"],
)
def test_bad_calibration_files(encoder_file, tmp_path, capsys, write, message):
    target = tmp_path / "calib.npz"
    write(target)
    if not target.exists():  # np.save appends .npy
        Path(f"{target}.npy").rename(target)
    out = tmp_path / "out.onnx"
    assert optimize_cli(encoder_file, "-o", out, "--preset", "int8", "--calibration", target) == 2
    assert message in one_error_line(capsys)


def test_model_inputs_without_shape_are_accepted_when_ort_runs_them(tmp_path, capsys):
    proto = add_model()
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    src = tmp_path / "noshape.onnx"
    onnx.save(proto, src)
    assert load_model(src).graph.inputs[0].shape is None
    assert optimize_cli(src, "-o", tmp_path / "o.onnx", "--preset", "fuse") == 0
    # Without a shape and with an op ORT does not know: still refused, with the checker's reason.
    proto.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain="com.example"))
    proto.graph.output[0].name = "z"
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(proto, src)
    with pytest.raises(ModelLoadError, match="Field 'shape' of 'type' is required"):
        load_model(src)


def test_info_with_an_invalid_isa_exits_2_without_a_path(monkeypatch, capsys):
    monkeypatch.setenv("FASTONNX_ISA", "sse9")
    assert main(["info"]) == 2
    out = capsys.readouterr().out
    assert "FASTONNX_ISA=sse9 is not one of" in out
    assert "path used     none" in out
    assert not any(f"path used     {isa}" in out for isa in ("amx", "avx512_vnni", "avx2", "ref"))
    assert main(["info", "--json"]) == 2
    assert '"best_path": null' in capsys.readouterr().out


# A child process that receives a signal in the middle of saving (after the temporary model is
# written, before it is moved into place).
_SIGNAL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import onnx_ir as ir
    from fastonnx.cli import main

    real_save = ir.save

    def save_then_signal(model, path, **kwargs):
        real_save(model, path, **kwargs)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))

    ir.save = save_then_signal
    sys.exit(main(["optimize", sys.argv[2], "-o", sys.argv[3], "--preset", "fuse"]))
    """
)


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 128 + 15), ("SIGINT", 130)])
def test_signal_during_save_leaves_nothing(tmp_path, sig, code):
    src = tmp_path / "in.onnx"
    onnx.save(add_model(), src)
    out = tmp_path / "o.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING_SAVE, sig, str(src), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] in ("terminated", "interrupted")
    assert not out.exists()
    assert leftovers(tmp_path) == [], "temporary files left behind"


def test_sigterm_handler_is_restored_after_main(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    src = tmp_path / "in.onnx"
    onnx.save(add_model(), src)
    assert optimize_cli(src, "-o", tmp_path / "o.onnx", "--preset", "fuse") == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_api_errors_are_input_errors(layout):
    model = layout / "m.onnx"
    with_location(model, "../secret.data")
    with pytest.raises(InputError):
        optimize(str(model))


# --------------------------------------------------------------------------------------------
# Fuzzer findings (fuzz/fuzz_loaders.py), each kept as a regression test. Protobuf hands a
# string field that is not valid UTF-8 back as bytes; each of these ended in a traceback.

_FUZZ_MODELS = {
    # external data location b"w.\0\0\0\x86": TypeError in the location check
    "location-not-utf8": (
        "CAo6ewoOCgF4CgFiEgF5IgNBZGQSA2FkZCo4CAgQAUIBYmoSCghsb2NhdGlvbhIGdy4AAACGagsKBm9mZnNldBIB"
        "MGoMCgZuZWxnaHQSAjM3cAHaFAoBeBIPCg0IARIJCgMSAUIKAggIYhQKAXkSDwoNCAESCQoDEgFCCgIICEIECgAQEQ==",
        "external data entry that is not valid UTF-8",
    ),
    # node domain b"co?.fast\xcennx": UnicodeDecodeError from onnx's checker quoting it
    "domain-not-utf8": (
        "CAo68QEKPAoBeAoBdxIBeSIMU3BhcnNlTGluZWFyKhUKCmFjdGl2YXRpb24iBGdlbHWgAQM6DGNvPy5mYXN0zm5ueBIG"
        "c3BhcnNlKn0IdBACQgF3SnRGWFNXAgAwAAQAAAAIAAAAAQAAAAQAAAAEAAAAAAAAAG8unjcAAAAARAAAAAAAAAAAAIA/"
        "AACAPwAAgD8AAIA/AAAAAAEAAAACAAAAAwAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAQAAAAABAAAAAAEAAAAAAVoUCgF4"
        "Eg8KDQgBEgkKAxIBTQoCCAhiFAoBeRIPCg0IARIJCgMSAU0KAggEQgQKABARQhAKDGNvbS5mYXN0b25ueBAB",
        "not UTF-8",
    ),
    # SparseLinear attribute name b"act\xf8vation": TypeError in the attribute check
    "attribute-not-utf8": (
        "CAo68QEKPAoBeAoBdxIBeSIMU3BhcnNlTGluZWFyKhUKCmFjdPh2YXRpb24iBGdlbHWgAQM6DGNvbS5mYXN0b25ueBIG"
        "c3BhcnNlKn0IdBACQgF3SnRGWFNXAgAwAAQAAAAIAAAAAQAAAAQAAAAEAAAAAAAAAG8unjcAAAAARAAAAAAAAAAAAIA/"
        "AACAPwAAgD8AAIA/AAAAAAEAAAACAAAAAwAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAQAAAAABAAAAAAEAAAAAAVoUCgF4"
        "Eg8KDQgBEgkKAxIBTQoCCAhiFAoBeRIPCg0IARIJCgMSAU0KAggEQgQKABARQhAKDGNvbS5mYXN0b250RhAB",
        "unknown attribute",
    ),
    # output dimension name b"\x91": onnx's checker passes it, onnx_ir's reader raised
    # SerdeError (a traceback)
    "dim-name-not-utf8": (
        "CAo6bAoOCgF4CgFiEgF5IgNBZGQSA2FkZCopCAgQAUIBYkogAACAPwAAgD8AAIA/AACAPwAAgD8AAIA/AACAPwAA"
        "gD9aFAoBeBIPCg0IARIJCgMSAUIKAggIYhQKAXkSDwoNCAESCQoDEgGRCgIICEIECgAQEQ==",
        "invalid ONNX model",
    ),
    # 12 floats (48 bytes) stored as "length 32" in a 32-byte w.data: only the length was
    # checked against the file, so onnx_ir's read failed with a ValueError traceback
    "length-short-of-shape": (
        "CAo6ewoOCgF4CgFiEgF5IgNBZGQSA2FkZCo4CAwQAUIBYmoSCghsb2NhdGlvbhIGdy5kYXRhagsKBm9mZnNldBIB"
        "MGoMCgZsZW5ndGgSAjMycAFaFAoBeBIPCg0IARIJCgMSAUIKAggIYhQKAXkSDwoNCAESCQoDEgFCCgIICEIECgAQEQ==",
        "says its external data is 32 bytes, but its shape and type need 48",
    ),
}


@pytest.mark.parametrize("case", list(_FUZZ_MODELS))
def test_fuzz_models_are_clear_errors(tmp_path, capsys, case):
    import base64

    data, message = _FUZZ_MODELS[case]
    src = tmp_path / "m.onnx"
    src.write_bytes(base64.b64decode(data))
    (tmp_path / "w.data").write_bytes(bytes(32))  # as the fuzz target has beside its models
    with pytest.raises(ModelLoadError, match=message):
        load_model(src)
    assert optimize_cli(src, "-o", tmp_path / "o.onnx") == 2
    assert message in one_error_line(capsys)


def test_internal_errors_exit_3_not_1(tmp_path, monkeypatch, capsys):
    # Exit 1 means only "verify beyond tolerance": a bug must not look like it.
    import fastonnx.optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fastonnx.optimizer, "optimize", broken)
    src = tmp_path / "in.onnx"
    onnx.save(add_model(), src)
    assert optimize_cli(src, "-o", tmp_path / "o.onnx", "--preset", "fuse") == 3
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "internal error" in err.strip().splitlines()[-1]


def test_empty_batch_through_a_sparse_int8_encoder(encoder_exports, tmp_path):
    # Finding 4 end to end: batch 0 through a lowered model gives the float model's empty shape.
    pytest.importorskip("fastonnx._native")
    from encoders import Combo
    from test_optimize_cli import _prune

    import fastonnx

    src = encoder_exports.get(Combo("bert", "sdpa", "dynamo")).path
    pruned, out = tmp_path / "pruned.onnx", tmp_path / "sparse.onnx"
    _prune(src, pruned)
    optimize(pruned, preset="sparse-int8", num_samples=2).save(out)
    graph = onnx.load(out, load_external_data=False).graph
    assert any(n.op_type == "SparseLinear" for n in graph.node)
    feed = {i.name: np.zeros((0, 16), np.int64) for i in graph.input}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)
    got = fastonnx.make_session(str(out)).run(None, feed)
    assert [a.shape for a in got] == [a.shape for a in ref]
    assert got[0].shape[0] == 0


def test_external_data_shorter_than_the_shape_needs(layout):
    # No length entry: the tensor's dims (256 floats = 1024 bytes) say how much must be there.
    (layout / "w.data").write_bytes(bytes(1000))
    model = layout / "m.onnx"
    with_location(model, "w.data")
    proto = onnx.load(model, load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    del entries[2]  # the length
    model.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match="is truncated: tensor 'b' needs bytes 0..1024"):
        load_model(model)
