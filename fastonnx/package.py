"""Strings in, answers out: the model packaged with its tokenizer (and pooling) in one graph.

``fastonnx package MODEL.onnx --tokenizer DIR -o OUT.onnx`` prepends the Hugging Face tokenizer
as onnxruntime-extensions ops (``ai.onnx.contrib``) and, for an encoder whose first output is
token states [1, S, D], appends the pooling (mean or CLS) and L2 normalization its
sentence-transformers configuration names. The packaged model takes one text, a string tensor
of shape [1], and returns ``sentence_embedding`` [1, D] (or the model's logits [1, C]); it runs
from any ORT binding with onnxruntime-extensions' library registered (and fastonnx's when it
holds fastonnx ops). The extensions' BertTokenizer op reads several strings as one sentence
pair, so a packaged model encodes one text per call; batch from Python with fastonnx.Encoder.

Texts longer than ``max_length`` tokens (default: the tokenizer's model maximum, at most 512)
are truncated as Hugging Face truncates: the first ``max_length - 1`` tokens and the final
[SEP]. Tokenizers the extensions cannot express are refused, naming them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

CONTRIB_DOMAIN = "ai.onnx.contrib"
_TOKENIZER_OUTPUTS = ("input_ids", "token_type_ids", "attention_mask")


class PackageError(ValueError):
    """The model or tokenizer cannot be packaged; the message says why."""


@dataclass
class PackageReport:
    tokenizer: str  # the Hugging Face tokenizer class
    pooling: str  # "mean", "cls" or "none" (the model's own output kept)
    normalize: bool
    max_length: int
    output: str

    def format(self) -> str:
        post = "" if self.pooling == "none" else f", {self.pooling} pooling"
        post += ", L2-normalized" if self.normalize else ""
        return (
            f"package: {self.tokenizer} in the graph (text [1] -> {self.output}{post}; "
            f"truncation at {self.max_length} tokens)"
        )


def tokenizer_model(tokenizer) -> ir.Model:
    """The onnxruntime-extensions pre-processing graph of a Hugging Face tokenizer."""
    try:
        from onnxruntime_extensions import gen_processing_models
    except ImportError as exc:
        raise PackageError(
            "packaging a tokenizer needs onnxruntime-extensions (pip install "
            "onnxruntime-extensions, or fastonnx[serve])"
        ) from exc
    name = type(tokenizer).__name__
    try:
        pre, _ = gen_processing_models(tokenizer, pre_kwargs=_bert_kwargs(tokenizer))
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise PackageError(
            f"onnxruntime-extensions cannot express the tokenizer {name}: {exc}"
        ) from exc
    if pre is None:
        raise PackageError(f"onnxruntime-extensions cannot express the tokenizer {name}")
    model = ir.from_proto(pre)
    outputs = [v.name for v in model.graph.outputs]
    if not set(_TOKENIZER_OUTPUTS) & set(outputs) or "input_ids" not in outputs:
        raise PackageError(f"the {name} graph gives {outputs}, not input_ids")
    return model


def _bert_kwargs(tokenizer) -> dict:
    """Hugging Face's BERT tokenizers strip accents whenever they lowercase, unless told
    otherwise (strip_accents=None); the extensions' converter strips them only when the
    tokenizer says so explicitly, so say it (else "münch" becomes [UNK] instead of mu ##nch)."""
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    if "do_lower_case" not in init and "strip_accents" not in init:
        return {}
    strip = init.get("strip_accents")
    if strip is None:
        strip = bool(init.get("do_lower_case", True))
    return {"strip_accents": int(bool(strip))}


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _add(graph: ir.Graph, op: str, inputs, name: str, **attrs) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs, name=name)
    graph.append(node)
    return node.outputs[0]


def package(
    model: ir.Model,
    tokenizer,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    config_dir: str | os.PathLike | None = None,
) -> PackageReport:
    """Prepends ``tokenizer`` (and appends pooling) to ``model``, in place.

    ``pooling``: "mean", "cls", "none" or None (from ``config_dir``'s sentence-transformers
    configuration; mean when there is none). Only for token-state outputs [B, S, D]."""
    from fastonnx.encoder import default_max_length, pooling_config

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if "input_ids" not in inputs:
        raise PackageError(f"the model has no 'input_ids' input (it takes {list(inputs)})")
    unknown = set(inputs) - set(_TOKENIZER_OUTPUTS)
    if unknown:
        raise PackageError(f"the tokenizer does not give the model inputs {sorted(unknown)}")
    cfg_pooling, cfg_normalize = pooling_config(config_dir)
    max_length = max_length or default_max_length(tokenizer, config_dir)
    if max_length < 2:
        raise PackageError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")

    pre = tokenizer_model(tokenizer)
    text = ir.Value(name="text", type=ir.TensorType(ir.DataType.STRING), shape=ir.Shape([1]))
    pre_input = pre.graph.inputs[0]
    first = next(iter(graph), None)
    for node in list(pre.graph):
        pre.graph.remove(node)
        node.name = f"tokenizer/{node.name or node.op_type}"
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
    pre_input.replace_all_uses_with(text)
    produced = {v.name: v for v in pre.graph.outputs}
    # Only the extensions' domain: the tokenizer graph's default-domain opset ("" or its alias
    # "ai.onnx") would clash with the model's.
    model.opset_imports[CONTRIB_DOMAIN] = pre.opset_imports.get(CONTRIB_DOMAIN, 1)

    # Truncation as Hugging Face does it: tokens [0, n - 1) and the last one, n = min(L, max).
    length = _add(graph, "Shape", [produced["input_ids"]], "package/length")
    n = _add(
        graph,
        "Min",
        [length, _const(graph, "package/max_length", np.array([max_length]))],
        "package/n",
    )
    n1 = _add(graph, "Sub", [n, _const(graph, "package/one", np.array([1]))], "package/n1")
    zero = _const(graph, "package/zero", np.array([0]))
    minus1 = _const(graph, "package/minus1", np.array([-1]))
    end = _const(graph, "package/end", np.array([np.iinfo(np.int64).max]))
    axes0 = _const(graph, "package/axes0", np.array([0]))
    for name, value in inputs.items():
        src = produced[name]
        head = _add(graph, "Slice", [src, zero, n1], f"package/{name}/head")
        last = _add(graph, "Slice", [src, minus1, end], f"package/{name}/last")
        joined = _add(graph, "Concat", [head, last], f"package/{name}/joined", axis=0)
        batched = _add(graph, "Unsqueeze", [joined, axes0], f"package/{name}/batched")
        dtype = value.dtype or ir.DataType.INT64
        feed = _add(graph, "Cast", [batched], f"package/{name}/cast", to=dtype)
        value.replace_all_uses_with(feed)
    graph.inputs.clear()
    graph.inputs.append(text)
    graph.sort()  # the glue was appended after the encoder that now reads it

    out = graph.outputs[0]
    token_states = out.shape is not None and out.shape.rank() == 3
    pooling = (pooling or cfg_pooling) if token_states else "none"
    if pooling not in ("mean", "cls", "none"):
        raise PackageError(f"pooling must be mean, cls or none, got {pooling!r}")
    normalize = (cfg_normalize if normalize is None else normalize) and pooling != "none"
    result, label = out, out.name
    if pooling == "mean":  # one text: every token is valid, so the masked mean is the mean
        axes1 = _const(graph, "package/axes1", np.array([1]))
        result = _add(graph, "ReduceMean", [out, axes1], "package/mean", keepdims=0)
    elif pooling == "cls":
        index = _const(graph, "package/cls", np.array(0, dtype=np.int64))
        result = _add(graph, "Gather", [out, index], "package/cls_token", axis=1)
    if normalize:
        result = _add(graph, "LpNormalization", [result], "package/normalize", axis=-1, p=2)
    if result is not out:
        taken = {v.name for n in graph for v in n.outputs}
        label = "sentence_embedding"
        while label in taken - {result.name}:
            label = "fastonnx_" + label
        result.name = label
        # Typed like the encoder's output, so the packaged model loads and checks like any other.
        result.dtype = out.dtype or ir.DataType.FLOAT
        result.shape = ir.Shape([1, out.shape.dims[-1]])
        graph.outputs.clear()
        graph.outputs.append(result)
    return PackageReport(type(tokenizer).__name__, pooling, normalize, max_length, label)
