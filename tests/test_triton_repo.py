"""`fastonnx triton-repo`: the generated config.pbtxt parsed by Triton's own ModelConfig schema
(from tritonclient), inputs/outputs as the ONNX model says, libraries, atomic replacement."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from fastonnx.cli import main
from fastonnx.serving.triton import (
    EXTENSIONS_LIBRARY,
    TritonRepoError,
    model_config_schema,
    validate_config,
    write_repository,
)

SCHEMA = model_config_schema()
needs_schema = pytest.mark.skipif(
    SCHEMA is None,
    reason="tritonclient (Triton's model_config_pb2 schema) is not installed: "
    "pip install tritonclient (it is in fastonnx[test])",
)


def parsed(report):
    return validate_config((report.path / "config.pbtxt").read_text(), SCHEMA)


def io(config):
    def rows(tensors):
        return [(t.name, SCHEMA.DataType.Name(t.data_type), list(t.dims)) for t in tensors]

    return rows(config.input), rows(config.output)


def fastonnx_op_model(path):
    """A model holding a com.fastonnx node (only its signature matters here: it is not run)."""
    node = helper.make_node("SparseLinear", ["x", "w"], ["y"], domain="com.fastonnx")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("w", TensorProto.UINT8, [4], [1, 2, 3, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.fastonnx", 1)],
    )
    model.ir_version = 10
    onnx.save(model, path)
    return path


@needs_schema
def test_token_model_repository(tiny_bert, tmp_path):
    report = write_repository(tiny_bert, tmp_path / "repo", name="bert", instances=2, threads=1)
    config = parsed(report)
    assert config.name == "bert" and config.backend == "onnxruntime"
    assert config.max_batch_size == 0
    inputs, outputs = io(config)
    names = [i.name for i in onnx.load(str(tiny_bert), load_external_data=False).graph.input]
    assert [i[0] for i in inputs] == names
    assert all(dtype == "TYPE_INT64" and dims == [-1, -1] for _, dtype, dims in inputs)
    assert outputs == [("last_hidden_state", "TYPE_FP32", [-1, -1, 64])]
    (group,) = config.instance_group
    assert group.count == 2 and group.kind == SCHEMA.ModelInstanceGroup.KIND_CPU
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert list(config.model_operations.op_library_filename) == []  # no fastonnx ops in it
    version = report.path / "1"
    assert (version / "model.onnx").is_file() and (version / "model.onnx.data").is_file()
    assert not [p for p in report.path.parent.iterdir() if p.name.startswith(".")]  # no temp


@needs_schema
def test_batched_repository_drops_the_batch_dimension(tiny_bert, tmp_path):
    report = write_repository(tiny_bert, tmp_path, name="b", max_batch_size=8)
    config = parsed(report)
    inputs, outputs = io(config)
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert all(dims == [-1] for _, _, dims in inputs)
    assert outputs[0][2] == [-1, 64]


@needs_schema
def test_fastonnx_library_is_named_and_copied(tmp_path):
    import fastonnx

    model = fastonnx_op_model(tmp_path / "sparse.onnx")
    report = write_repository(model, tmp_path / "repo", server_repo_path="/models")
    config = parsed(report)
    assert config.name == "sparse"
    assert list(config.model_operations.op_library_filename) == [
        "/models/sparse/libfastonnx_ops.so"
    ]
    copied = report.path / "libfastonnx_ops.so"
    assert copied.read_bytes() == Path(fastonnx.get_library_path()).read_bytes()


@needs_schema
def test_tokenizer_inside_repository(tiny_bert, tokenizer, tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    _, folder = tokenizer
    packaged = tmp_path / "text.onnx"
    assert main(["package", str(tiny_bert), "-o", str(packaged), "--tokenizer", str(folder)]) == 0
    with pytest.raises(TritonRepoError, match="standalone build of libortextensions.so"):
        write_repository(packaged, tmp_path / "repo")
    ext = tmp_path / "build" / "libortextensions.so"
    ext.parent.mkdir()
    ext.write_bytes(b"stand-in for a standalone build")
    report = write_repository(packaged, tmp_path / "repo", extensions_library=ext)
    config = parsed(report)
    inputs, outputs = io(config)
    assert inputs == [("text", "TYPE_STRING", [1])]
    # One text in, one pooled vector out: the packaged output is typed [1, D] in the file.
    assert outputs == [("sentence_embedding", "TYPE_FP32", [1, 64])]
    libs = list(config.model_operations.op_library_filename)
    assert libs == [f"{(tmp_path / 'repo').resolve()}/text/{EXTENSIONS_LIBRARY}"]
    assert (report.path / EXTENSIONS_LIBRARY).read_bytes() == ext.read_bytes()
    with pytest.raises(TritonRepoError, match="dynamic first"):
        write_repository(packaged, tmp_path / "r2", extensions_library=ext, max_batch_size=4)


@needs_schema
def test_schema_refuses_what_triton_would():
    with pytest.raises(TritonRepoError, match="does not parse"):
        validate_config('name: "m"\nbackend: "onnxruntime"\nnot_a_field: 1\n', SCHEMA)
    with pytest.raises(TritonRepoError, match="does not parse"):
        validate_config('input [ { name: "x" data_type: TYPE_NOPE } ]', SCHEMA)


def test_existing_repository_is_replaced_only_with_force(tiny_bert, tmp_path):
    write_repository(tiny_bert, tmp_path, name="m", instances=1)
    before = (tmp_path / "m" / "config.pbtxt").read_text()
    with pytest.raises(TritonRepoError, match="exists"):
        write_repository(tiny_bert, tmp_path, name="m", instances=3)
    assert (tmp_path / "m" / "config.pbtxt").read_text() == before
    write_repository(tiny_bert, tmp_path, name="m", instances=3, force=True)
    assert "count: 3" in (tmp_path / "m" / "config.pbtxt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_input_exits_2(tiny_bert, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton-repo", str(tmp_path / "none.onnx"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_bert), str(out), "--name", "../up"]) == 2
    assert "model name" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_bert), str(out), "--instances", "0"]) == 2
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    assert main(["triton-repo", str(junk), str(out)]) == 2
    assert main(["triton-repo", str(tiny_bert), str(out), "--extensions-library", "x.so"]) == 2
    assert "no onnxruntime-extensions ops" in capsys.readouterr().err
    assert not (out / "model").exists()
    assert main(["triton-repo", str(tiny_bert), str(out)]) == 0
