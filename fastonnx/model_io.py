"""Loading and saving ONNX models safely, and opening ORT sessions on in-memory models.

Loading checks, in order, what users get wrong most often and says so in one line: the path is not
a file, the file is not an ONNX protobuf (or is truncated), an external data file is missing or too
short, the model is malformed, or its IR / opset version is newer than the installed ONNX Runtime
accepts.

Saving is atomic: the model (and its external data, when it needs one) is written into a temporary
folder beside the destination and moved into place with ``os.replace``, so a failure leaves no
partial output and an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from fastonnx.runtime import OP_DOMAIN

# A serialized ModelProto cannot exceed 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
_TINY_TENSOR_BYTES = 1024  # tensors at most this size stay inline when external data is used


_DRIVE = re.compile(r"[A-Za-z]:")  # a Windows drive letter: absolute there


class InputError(ValueError):
    """A problem with what the user gave us (a file, an option), reported without a traceback."""


class ModelLoadError(InputError):
    """The model file cannot be used: missing, not ONNX, truncated, or unsupported by ORT."""


class ModelRunError(InputError):
    """ONNX Runtime refused to load or run a model (an unknown custom op, a bad input...)."""


# --------------------------------------------------------------------------------------------
# ORT version limits


@functools.cache
def ort_limits() -> tuple[int, int]:
    """(max IR version, max ai.onnx opset) the installed onnxruntime accepts.

    Probed once with a one-node model rather than hard-coded, so the answer follows the installed
    ORT (1.31 accepts IR <= 13 and opset <= 26).
    """
    import onnxruntime as ort

    def loads(ir_version: int, opset: int) -> bool:
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        proto = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir_version
        )
        so = ort.SessionOptions()
        so.log_severity_level = 4
        try:
            ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any refusal means "not supported"
            return False
        return True

    def highest(lo: int, hi: int, ok) -> int:
        # Largest v in [lo, hi] with ok(v), assuming ok is monotone and ok(lo) holds.
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    max_ir = highest(7, 64, lambda v: loads(v, 13))
    max_opset = highest(13, 128, lambda v: loads(7, v))
    return max_ir, max_opset


def check_ort_versions(ir_version: int, opset: int | None, *, what: str = "model") -> None:
    """Raise :class:`ModelLoadError` if ORT cannot load a model with these versions."""
    import onnxruntime as ort

    max_ir, max_opset = ort_limits()
    if ir_version > max_ir:
        raise ModelLoadError(
            f"{what} has ONNX IR version {ir_version}; onnxruntime {ort.__version__} loads at most "
            f"IR version {max_ir} (re-export with an older onnx, or set model.ir_version)"
        )
    if opset is not None and opset > max_opset:
        raise ModelLoadError(
            f"{what} uses ai.onnx opset {opset}; onnxruntime {ort.__version__} supports at most "
            f"opset {max_opset} (re-export with opset_version={max_opset} or lower)"
        )


# --------------------------------------------------------------------------------------------
# Loading


def _text(value: str | bytes) -> str | None:
    """A protobuf string field as str; None when it is not valid UTF-8 (protobuf then hands
    back bytes: found by fuzzing)."""
    return value if isinstance(value, str) else None


# Element types stored two to a byte.
_PACKED_4BIT = {
    getattr(onnx.TensorProto, t)
    for t in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, t)
}


def _data_bytes(tensor: onnx.TensorProto, name: str) -> int:
    """Bytes the tensor's dims and type need (what a reader will take from its data file)."""
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"tensor '{name}' has a negative dimension {list(tensor.dims)}")
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise ModelLoadError(
            f"tensor '{name}' has element type {tensor.data_type}, which cannot be external data"
        ) from None
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ModelLoadError(f"tensor '{name}' holds strings, which cannot be external data")
    return count * itemsize


def _external_locations(proto: onnx.ModelProto) -> Iterator[tuple[str, str, int, int, int]]:
    """(tensor name, location, offset, length, bytes its dims need) of every external
    initializer, subgraphs too."""

    for graph in _graphs(proto.graph):
        for tensor in graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            name = _text(tensor.name)
            if name is None:
                raise ModelLoadError("a tensor name is not valid UTF-8")
            info: dict[str, str] = {}
            for entry in tensor.external_data:
                key, value = _text(entry.key), _text(entry.value)
                if key is None or value is None:
                    raise ModelLoadError(
                        f"tensor '{name}' has an external data entry that is not valid UTF-8"
                    )
                info[key] = value
            try:
                length = int(info["length"]) if "length" in info else -1
                offset = int(info.get("offset", 0))
            except ValueError:
                raise ModelLoadError(
                    f"tensor '{name}' has a non-numeric external data offset or length"
                ) from None
            yield name, info.get("location", ""), offset, length, _data_bytes(tensor, name)


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file refers to (resolved; they may not exist).

    Call it on a model :func:`load_model` accepted: it does not check the locations itself.
    """
    path = Path(path)
    proto = onnx.load(path, load_external_data=False)
    found = {(path.parent / loc).resolve() for _, loc, *_ in _external_locations(proto)}
    return sorted(found)


def _location_problem(location: str) -> str | None:
    """Why an external data location is refused on its text alone (no file is looked at)."""
    if not location:
        return "is empty"
    if "\0" in location:
        return "contains a NUL byte"
    # Both separators: a model written on Windows must not escape either.
    parts = location.replace("\\", "/").split("/")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or _DRIVE.match(location):
        return "is an absolute path"
    if ".." in parts:
        return "contains '..'"
    return None


def check_external_locations(
    locations: Iterable[tuple[str, str]], folder: Path | None, *, what: str = "model"
) -> None:
    """Refuse external data that is not a file inside ``folder`` (the model's own folder).

    ``locations``: (tensor name, location) pairs. No absolute paths, no ``..``, and no symbolic
    link on the way that leads out of the folder. Every location is checked before any data file
    is opened or stat-ed, and the messages are the same whether or not an outside file exists.
    ``folder`` None (a model given in memory): any external data is refused, since there is no
    folder to resolve it against (the working directory would be a guess).
    """
    locations = list(locations)
    for name, location in locations:
        problem = _location_problem(location)
        if problem:
            raise ModelLoadError(
                f"{what}: tensor '{name}' has an external data location {location!r} that "
                f"{problem}; external data must be a file inside the model's folder"
            )
    if not locations:
        return
    if folder is None:
        name, location = locations[0]
        raise ModelLoadError(
            f"{what}: tensor '{name}' is stored in external data file {location!r}, but the model "
            "was given in memory, with no folder to find it in; pass the model's path instead "
            "(or load it with onnx.load(path), which reads the data)"
        )
    root = folder.resolve()
    for name, location in locations:
        # resolve() follows links (without needing the target to exist): a link inside the
        # folder that points out of it is caught here, before anything is read through it.
        target = (folder / location).resolve()
        if target == root or not target.is_relative_to(root):
            raise ModelLoadError(
                f"{what}: tensor '{name}' has an external data location {location!r} that "
                "leads out of the model's folder (through a symbolic link); external data must "
                "be a file inside the model's folder"
            )


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    entries = list(_external_locations(proto))
    check_external_locations(((n, loc) for n, loc, *_ in entries), path.parent, what=str(path))
    sizes: dict[Path, int] = {}
    for name, location, offset, length, needed in entries:
        data_path = path.parent / location
        if data_path not in sizes:
            if not data_path.is_file():
                raise ModelLoadError(
                    f"{path}: missing external data file '{location}' (expected at {data_path}), "
                    f"needed by tensor '{name}'; keep the .onnx and its data file together"
                )
            sizes[data_path] = data_path.stat().st_size
        if offset < 0 or length < -1:
            raise ModelLoadError(
                f"{path}: tensor '{name}' has a negative external data offset or length"
            )
        if 0 <= length < needed:
            raise ModelLoadError(
                f"{path}: tensor '{name}' says its external data is {length} bytes, but its "
                f"shape and type need {needed}"
            )
        if offset + needed > sizes[data_path]:
            raise ModelLoadError(
                f"{path}: external data file '{location}' is truncated: tensor '{name}' needs "
                f"bytes {offset}..{offset + needed} but the file has {sizes[data_path]}"
            )


# com.fastonnx: the opset versions that exist and each op's attributes. ORT's C API lets a kernel
# read attributes only by name, so unknown ones (a typo such as "activaton") and a later opset
# can only be caught here (docs/operators.md).
FASTONNX_OPSETS = (1,)
FASTONNX_OP_ATTRIBUTES = {
    "SparseLinear": {"activation"},
    "SparseLinearU8": {"activation"},
    "Attention": {"num_heads", "scale"},
    "LayerNorm": {"epsilon", "axis"},
    "PackTokens": set(),
    "UnpackTokens": set(),
    "SelectTokens": {"keep_ratio"},
}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def check_fastonnx_nodes(proto: onnx.ModelProto, *, what: str = "model") -> None:
    """Refuse a com.fastonnx opset that does not exist and unknown attributes on its ops."""
    for entry in proto.opset_import:
        if entry.domain == OP_DOMAIN and entry.version not in FASTONNX_OPSETS:
            raise ModelLoadError(
                f"{what} imports {OP_DOMAIN} opset {entry.version}; this fastonnx has "
                f"opset {', '.join(map(str, FASTONNX_OPSETS))} only"
            )
    for graph in _graphs(proto.graph):
        for node in graph.node:
            known = FASTONNX_OP_ATTRIBUTES.get(node.op_type)
            if node.domain != OP_DOMAIN or known is None:
                continue
            # (A name that is not UTF-8 comes back as bytes: shown as its repr.)
            names = {a.name if isinstance(a.name, str) else repr(a.name) for a in node.attribute}
            unknown = sorted(names - known)
            if unknown:
                raise ModelLoadError(
                    f"{what}: {node.op_type} node '{node.name}' has unknown attribute(s) "
                    f"{', '.join(unknown)} (it takes: {', '.join(sorted(known))})"
                )


def _missing_shape_only(exc: Exception) -> bool:
    return "Field 'shape' of 'type' is required but missing" in str(exc)


def _ort_loads(path: Path) -> bool:
    """Whether ONNX Runtime creates a session on the model file (fastonnx's ops registered)."""
    import onnxruntime as ort

    try:
        from fastonnx.runtime import session_options

        so = session_options()
    except Exception:  # noqa: BLE001 - without the library, plain ORT decides
        so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any refusal means "ORT does not run it"
        return False
    return True


def _default_opset(proto: onnx.ModelProto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (with its external data) as an ``onnx_ir`` model, after checking it.

    External data is read into memory, except for models over 2 GiB of weights, whose tensors
    stay memory-mapped from their files. Raises :class:`ModelLoadError` with a one-line reason
    when the file cannot be used.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning, ...
        raise ModelLoadError(
            f"{path}: not an ONNX model, or the file is truncated ({_first_line(exc)})"
        ) from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0 or proto.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph, nodes or IR version found)")
    _check_external_data(proto, path)
    # Before the checker, whose own version complaint does not say what ORT accepts.
    check_ort_versions(proto.ir_version, _default_opset(proto), what=str(path))
    check_fastonnx_nodes(proto, what=str(path))
    try:
        # The path form resolves external data beside the model (the proto form would resolve it
        # against the working directory).
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        # The checker wants a `shape` on every graph input and output; ORT runs models without
        # one (rank unknown), so such a model is refused only when ORT refuses it too.
        if not (_missing_shape_only(exc) and _ort_loads(path)):
            raise ModelLoadError(f"{path}: invalid ONNX model: {_first_line(exc)}") from exc
    except UnicodeDecodeError as exc:  # the checker's message quotes a non-UTF-8 name (fuzzing)
        raise ModelLoadError(f"{path}: invalid ONNX model: a name or string is not UTF-8") from exc

    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - whatever the checker let through (found by fuzzing)
        raise ModelLoadError(f"{path}: invalid ONNX model: {_first_line(exc)}") from exc
    ir.external_data.set_base_dir(model.graph, path.parent)
    if weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
        # Tools that serialize the model (ORT's shape inference, sessions from bytes) cannot
        # follow a relative data path; only models too big for one protobuf stay mapped.
        ir.external_data.load_to_model(model)
    return model


def as_model(model: ir.Model | onnx.ModelProto | str | os.PathLike) -> ir.Model:
    """An ``onnx_ir`` model from a path, an ``onnx.ModelProto``, or an ``ir.Model`` (as is)."""
    if isinstance(model, ir.Model):
        _check_model_external_tensors(model)
        return model
    if isinstance(model, onnx.ModelProto):
        # No folder: any external data reference is refused (before onnx_ir would resolve it
        # against the working directory).
        entries = ((n, loc) for n, loc, *_ in _external_locations(model))
        check_external_locations(entries, None, what="the model")
        check_fastonnx_nodes(model, what="the model")
        return ir.serde.deserialize_model(model)
    if isinstance(model, str | os.PathLike):
        return load_model(model)
    raise TypeError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model)!r}")


def _check_model_external_tensors(model: ir.Model) -> None:
    """The external-data rule of :func:`check_external_locations` for an ``onnx_ir`` model."""
    by_folder: dict[str, list[tuple[str, str]]] = {}
    for value in _all_initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            by_folder.setdefault(str(tensor.base_dir), []).append(
                (value.name or "?", str(tensor.location))
            )
    for base_dir, entries in by_folder.items():
        check_external_locations(entries, Path(base_dir) if base_dir else None, what="the model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------------
# Sizes and tensors


def _all_initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.initializers.values()


def weights_nbytes(model: ir.Model) -> int:
    """Total bytes of the model's initializers (the bulk of its file size)."""
    return sum(v.const_value.nbytes for v in _all_initializers(model) if v.const_value is not None)


def has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _all_initializers(model))


def domains_used(model: ir.Model) -> set[str]:
    """Operator domains of the model's nodes ('' for ai.onnx)."""
    return {node.domain for graph in model.graphs() for node in graph}


# --------------------------------------------------------------------------------------------
# Saving


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: Iterable[str | os.PathLike] = (),
    external_data: bool | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``protect`` lists files that must never be overwritten (the input model and its data files).
    ``external_data``: None writes the weights to ``<path>.data`` only when they exceed
    ``external_data_threshold`` bytes (a protobuf cannot exceed 2 GiB); True/False force it.
    In-memory models keep their tensors; memory-mapped external tensors are read, not moved.
    """
    path = Path(path)
    data_name = path.name + ".data"
    protected = [Path(p) for p in protect]
    for target in (path, path.parent / data_name):
        for guarded in protected:
            if _same_file(target, guarded):
                raise InputError(
                    f"refusing to write {target}: it is the input model or one of its data files; "
                    "choose another output path"
                )
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"output path {path} is a folder")
    if external_data is None:
        external_data = weights_nbytes(model) > external_data_threshold

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(
                model, tmp_model, external_data=data_name, size_threshold_bytes=_TINY_TENSOR_BYTES
            )
            os.replace(tmp_dir / data_name, path.parent / data_name)
        else:
            # Inline save would otherwise keep references to the input's data file.
            ir.external_data.load_to_model(model)
            ir.save(model, tmp_model)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------
# ORT sessions on in-memory models


@contextlib.contextmanager
def ort_session(
    model: ir.Model,
    sess_options=None,
    *,
    optimized_model_path: str | os.PathLike | None = None,
    what: str = "the model",
):
    """An ORT CPU ``InferenceSession`` on an ``onnx_ir`` model, as a context manager.

    ORT refusing the model raises :class:`ModelRunError` naming ``what`` and ORT's reason.
    Small in-memory models are passed as bytes; models with memory-mapped external tensors or
    more than 2 GiB of weights go through a temporary folder (removed on exit).
    ``optimized_model_path`` asks ORT to write the graph it will run (weights to a side file).
    """
    import onnxruntime as ort

    if sess_options is None:
        sess_options = ort.SessionOptions()
    # Failures come back as ModelRunError with ORT's reason; its own log line would repeat it.
    sess_options.log_severity_level = 4
    if optimized_model_path is not None:
        sess_options.optimized_model_filepath = str(optimized_model_path)
        # Keep the written graph small: weights go to a side file.
        sess_options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            Path(optimized_model_path).name + ".data",
        )
        sess_options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    providers = ["CPUExecutionProvider"]

    def open_session(source):
        try:
            return ort.InferenceSession(source, sess_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelRunError(f"ONNX Runtime cannot load {what}: {_first_line(exc)}") from exc

    if not has_external_tensors(model) and weights_nbytes(model) <= EXTERNAL_DATA_THRESHOLD:
        yield open_session(ir.serde.serialize_model(model).SerializeToString())
        return
    with tempfile.TemporaryDirectory(prefix="fastonnx-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        ir.save(model, tmp_path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield open_session(str(tmp_path))
