"""A Triton Inference Server model repository for an ONNX encoder (onnxruntime backend).

Layout written (atomically: built in a temporary folder beside it, then renamed)::

    OUT/NAME/config.pbtxt        backend "onnxruntime", inputs/outputs from the ONNX graph,
                                 instance_group KIND_CPU, model_operations (custom-op libraries)
    OUT/NAME/1/model.onnx        the model (and its external data files)
    OUT/NAME/libfastonnx_ops.so  fastonnx's custom-op library, when the model uses its ops
    OUT/NAME/libortextensions.so onnxruntime-extensions' library, for a tokenizer-inside model

Triton reads ``op_library_filename`` as a path on the server, so it is written as
``SERVER_REPO/NAME/<library>``, ``SERVER_REPO`` being OUT's absolute path unless the repository
is mounted elsewhere (``/models`` in the usual container layout). Triton ignores files in the
model folder that are not numeric version folders.

The onnxruntime-extensions library of the PyPI wheel is a Python extension module: it does not
load outside a Python process (``undefined symbol: PyInstanceMethod_Type``), so a
tokenizer-inside model needs a standalone build of it (``libortextensions.so`` from the
onnxruntime-extensions sources), given explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from fastonnx.runtime import OP_DOMAIN

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
MODEL_FILENAME = "model.onnx"
EXTENSIONS_LIBRARY = "libortextensions.so"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# ONNX TensorProto element types -> Triton model-config DataType names.
_TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}


class TritonRepoError(ValueError):
    """The repository cannot be written (or a config is invalid); the message says why."""


@dataclass
class Tensor:
    name: str
    data_type: str  # a Triton TYPE_* name
    dims: list[int]  # -1 for a dynamic dimension


@dataclass
class RepoReport:
    path: Path
    config: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    libraries: list[str] = field(default_factory=list)  # op_library_filename entries
    validated: str = ""  # how the config was checked

    def format(self) -> str:
        io = ", ".join(f"{t.name} {t.data_type} {t.dims}" for t in self.inputs)
        out = ", ".join(f"{t.name} {t.data_type} {t.dims}" for t in self.outputs)
        libs = ", ".join(self.libraries) or "none"
        return (
            f"triton-repo: {self.path}: in {io}; out {out}; op libraries {libs}; {self.validated}"
        )


# ORT's NodeArg type strings -> ONNX element types (for values the file leaves untyped).
_ORT_TYPES = {
    f"tensor({name})": code
    for name, code in (
        ("bool", onnx.TensorProto.BOOL),
        ("uint8", onnx.TensorProto.UINT8),
        ("uint16", onnx.TensorProto.UINT16),
        ("uint32", onnx.TensorProto.UINT32),
        ("uint64", onnx.TensorProto.UINT64),
        ("int8", onnx.TensorProto.INT8),
        ("int16", onnx.TensorProto.INT16),
        ("int32", onnx.TensorProto.INT32),
        ("int64", onnx.TensorProto.INT64),
        ("float16", onnx.TensorProto.FLOAT16),
        ("float", onnx.TensorProto.FLOAT),
        ("double", onnx.TensorProto.DOUBLE),
        ("string", onnx.TensorProto.STRING),
        ("bfloat16", onnx.TensorProto.BFLOAT16),
    )
}


def _typed_by_ort(proto: onnx.ModelProto, model: Path, domains: set[str]) -> None:
    """Fills in graph inputs/outputs the file leaves without a type or shape (``fastonnx
    package`` leaves its pooled output so) from an ORT session, which infers them."""
    import onnxruntime as ort

    from fastonnx.runtime import session_options

    so = session_options() if OP_DOMAIN in domains else ort.SessionOptions()
    if EXTENSIONS_DOMAIN in domains:
        try:
            import onnxruntime_extensions as ortx
        except ImportError as exc:
            raise TritonRepoError(
                "the model has untyped inputs/outputs and onnxruntime-extensions ops: reading "
                "their types needs onnxruntime-extensions (pip install onnxruntime-extensions)"
            ) from exc
        so.register_custom_ops_library(ortx.get_library_path())
    try:
        session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise TritonRepoError(f"{model}: ONNX Runtime cannot load it: {exc}") from exc
    args = {a.name: a for a in [*session.get_inputs(), *session.get_outputs()]}
    for value in [*proto.graph.input, *proto.graph.output]:
        tt = value.type.tensor_type
        arg = args.get(value.name)
        if arg is None or (tt.elem_type and tt.HasField("shape")):
            continue
        if not tt.elem_type:
            tt.elem_type = _ORT_TYPES.get(arg.type, onnx.TensorProto.UNDEFINED)
        if not tt.HasField("shape"):
            tt.shape.SetInParent()
            for d in arg.shape:
                dim = tt.shape.dim.add()
                if isinstance(d, int) and d >= 0:
                    dim.dim_value = d


def _untyped(proto: onnx.ModelProto) -> bool:
    values = [*proto.graph.input, *proto.graph.output]
    return any(
        not v.type.tensor_type.elem_type or not v.type.tensor_type.HasField("shape")
        for v in values
        if not v.type.HasField("sequence_type") and not v.type.HasField("map_type")
    )


def _tensors(values, what: str) -> list[Tensor]:
    tensors = []
    for value in values:
        tt = value.type.tensor_type
        if tt.elem_type not in _TRITON_TYPES:
            raise TritonRepoError(
                f"{what} '{value.name}' has ONNX element type "
                f"{onnx.TensorProto.DataType.Name(tt.elem_type)}, which Triton has no type for"
            )
        if not tt.HasField("shape"):
            raise TritonRepoError(f"{what} '{value.name}' has no shape (rank unknown)")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if not dims:
            dims = [1]  # a scalar: Triton wants at least one dimension
        tensors.append(Tensor(value.name, _TRITON_TYPES[tt.elem_type], dims))
    return tensors


def _domains(proto: onnx.ModelProto) -> set[str]:
    found = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add(node.domain)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    for function in proto.functions:
        for node in function.node:
            found.add(node.domain)
    return found


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(tensors: list[Tensor]) -> str:
    items = []
    for t in tensors:
        items.append(
            "  {\n"
            f"    name: {_quote(t.name)}\n"
            f"    data_type: {t.data_type}\n"
            f"    dims: [ {', '.join(str(d) for d in t.dims)} ]\n"
            "  }"
        )
    return "[\n" + ",\n".join(items) + "\n]"


def config_text(
    name: str,
    inputs: list[Tensor],
    outputs: list[Tensor],
    *,
    libraries: list[str],
    instances: int,
    threads: int | None,
    max_batch_size: int,
) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ``inference.ModelConfig``)."""
    lines = [
        f"name: {_quote(name)}",
        'backend: "onnxruntime"',
        f"default_model_filename: {_quote(MODEL_FILENAME)}",
        f"max_batch_size: {max_batch_size}",
        f"input {_tensor_block(inputs)}",
        f"output {_tensor_block(outputs)}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]",
    ]
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    if libraries:
        names = ", ".join(_quote(lib) for lib in libraries)
        lines.append(f"model_operations {{\n  op_library_filename: [ {names} ]\n}}")
    if threads is not None:
        lines.append(
            'parameters {\n  key: "intra_op_thread_count"\n'
            f'  value: {{ string_value: "{threads}" }}\n}}'
        )
    return "\n".join(lines) + "\n"


def model_config_schema():
    """Triton's ``model_config_pb2`` module from the tritonclient package, or None when
    tritonclient is not installed (TritonRepoError when it is but its schema does not load).

    ``tritonclient.grpc`` refuses to import without its grpc extra, although the schema
    module itself needs only protobuf: load that one file directly then."""
    import importlib.util
    import sys

    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except ImportError:
        pass
    except RuntimeError:  # "The installation does not include grpc support"
        pass
    key = "fastonnx._triton_model_config_pb2"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - e.g. protobuf older than the schema's gencode
        raise TritonRepoError(
            f"Triton's schema in {path} does not load with this protobuf: {exc}"
        ) from exc
    sys.modules[key] = module
    return module


def validate_config(text: str, schema=None):
    """Parses ``text`` with Triton's model-config schema; the ``ModelConfig`` message.

    Raises TritonRepoError on a parse error or an unknown field, or when tritonclient (which
    ships the schema) is not installed."""
    from google.protobuf import text_format

    schema = schema or model_config_schema()
    if schema is None:
        raise TritonRepoError("validating needs Triton's schema: pip install tritonclient")
    config = schema.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise TritonRepoError(
            f"config.pbtxt does not parse as Triton's ModelConfig: {exc}"
        ) from exc
    return config


def write_repository(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    instances: int = 1,
    threads: int | None = None,
    max_batch_size: int = 0,
    server_repo_path: str | None = None,
    extensions_library: str | os.PathLike | None = None,
    force: bool = False,
) -> RepoReport:
    """Writes ``out_dir/name`` (see the module docstring) and returns what it holds."""
    from fastonnx.model_io import InputError, _check_external_data, external_data_files

    model = Path(model)
    out_dir = Path(out_dir)
    name = name or model.stem.split(".")[0]
    if not _NAME.fullmatch(name):
        raise TritonRepoError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
    if instances < 1:
        raise TritonRepoError(f"instance count must be >= 1, got {instances}")
    if threads is not None and threads < 0:
        raise TritonRepoError(f"threads must be >= 0, got {threads}")
    if max_batch_size < 0:
        raise TritonRepoError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if not model.is_file():
        raise TritonRepoError(f"model {model} does not exist")
    try:
        proto = onnx.load(str(model), load_external_data=False)
        # Before anything is copied: external data only from files inside the model's folder.
        # (Not load_model's full check: the model is not run here, and packaged models carry
        # value_info entries without types that onnx.checker refuses and ORT accepts.)
        _check_external_data(proto, model)
    except InputError as exc:
        raise TritonRepoError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise TritonRepoError(f"{model}: not an ONNX model ({exc})") from exc
    if not proto.graph.node or not proto.graph.output:
        raise TritonRepoError(f"{model}: not an ONNX model (no nodes or outputs)")
    domains = _domains(proto)
    if _untyped(proto):
        _typed_by_ort(proto, model, domains)
    inputs = _tensors(proto.graph.input, "input")
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [t for t in inputs if t.name not in initializers]
    outputs = _tensors(proto.graph.output, "output")
    if max_batch_size > 0:
        fixed = [t.name for t in inputs + outputs if t.dims[0] != -1]
        if fixed:
            raise TritonRepoError(
                f"max_batch_size > 0 needs a dynamic first (batch) dimension; {fixed} have a "
                "fixed one (a tokenizer-inside model takes one text: use max_batch_size 0)"
            )
        inputs = [Tensor(t.name, t.data_type, t.dims[1:] or [1]) for t in inputs]
        outputs = [Tensor(t.name, t.data_type, t.dims[1:] or [1]) for t in outputs]

    copies: dict[str, Path] = {}  # file name in the model folder -> source
    if OP_DOMAIN in domains:
        from fastonnx.runtime import get_library_path

        library = Path(get_library_path())
        copies[library.name] = library
    if EXTENSIONS_DOMAIN in domains:
        if extensions_library is None:
            raise TritonRepoError(
                "the model has the tokenizer inside (onnxruntime-extensions ops): give a "
                "standalone build of libortextensions.so with --extensions-library; the PyPI "
                "wheel's library is a Python extension that does not load in Triton"
            )
        ext = Path(extensions_library)
        if not ext.is_file():
            raise TritonRepoError(f"extensions library {ext} does not exist")
        if ext.name.startswith("_extensions_pydll"):
            raise TritonRepoError(
                f"{ext} is the onnxruntime-extensions Python module, which does not load "
                "outside Python (undefined symbol PyInstanceMethod_Type): build the "
                "standalone libortextensions.so from the onnxruntime-extensions sources"
            )
        copies[EXTENSIONS_LIBRARY] = ext
    elif extensions_library is not None:
        raise TritonRepoError(
            "the model has no onnxruntime-extensions ops: drop --extensions-library"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    if target.exists() and not force:
        raise TritonRepoError(f"{target} exists (--force replaces it)")
    server_root = server_repo_path or str(out_dir.resolve())
    libraries = [f"{server_root.rstrip('/')}/{name}/{file}" for file in sorted(copies)]
    text = config_text(
        name,
        inputs,
        outputs,
        libraries=libraries,
        instances=instances,
        threads=threads,
        max_batch_size=max_batch_size,
    )
    schema = model_config_schema()
    if schema is not None:
        validate_config(text, schema)
        validated = "config parsed by Triton's ModelConfig schema"
    else:
        validated = "config NOT schema-checked (pip install tritonclient)"

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    try:
        version = tmp / "1"
        version.mkdir()
        shutil.copyfile(model, version / MODEL_FILENAME)
        for data in external_data_files(model):
            relative = data.relative_to(model.resolve().parent)
            (version / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data, version / relative)
        for file, source in copies.items():
            shutil.copyfile(source, tmp / file)
        (tmp / "config.pbtxt").write_text(text)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the server may run as another user
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=out_dir))
            os.replace(target, old / name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RepoReport(target, text, inputs, outputs, libraries, validated)
