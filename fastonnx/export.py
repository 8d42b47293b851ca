"""Export a Hugging Face encoder to ONNX with the inputs and axes fastonnx's passes expect.

The exported graph has inputs ``input_ids`` and ``attention_mask`` (both int64 [B, S]), plus
``token_type_ids`` when the model has more than one token type, and one output
``last_hidden_state`` (float [B, S, D]). B (batch) and S (sequence) are dynamic axes; D is the
hidden size.

Both of torch's exporters are supported: ``dynamo=True`` (torch.export + onnxscript, the default)
and ``dynamo=False`` (the legacy TorchScript tracer). Whichever is used, the model is called
through a small wrapper that passes the inputs by keyword and returns only the hidden state:
the tracers pass example inputs positionally, and the positional order of ``forward`` differs
between model classes (and the legacy tracer cannot return a ``ModelOutput``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import onnx

# ORT 1.31 refuses models whose IR version is above 13; the exporters write 8 to 10 today, but a
# newer onnx could raise it, and failing at export time beats failing when a session is created.
MAX_ORT_IR_VERSION = 13

OUTPUT_NAME = "last_hidden_state"


def uses_token_type_ids(torch_model: Any) -> bool:
    """Whether the model takes ``token_type_ids`` that can change its output.

    RoBERTa accepts the argument but has a single token type (``type_vocab_size == 1``), so its
    tokenizer never produces it; DistilBERT has no such argument at all.
    """
    params = inspect.signature(torch_model.forward).parameters
    type_vocab_size = getattr(getattr(torch_model, "config", None), "type_vocab_size", 0) or 0
    return "token_type_ids" in params and type_vocab_size > 1


def input_names_for(torch_model: Any) -> list[str]:
    """The graph input names :func:`export_encoder` gives to this model, in order."""
    names = ["input_ids", "attention_mask"]
    if uses_token_type_ids(torch_model):
        names.append("token_type_ids")
    return names


def _wrapper(torch_model: Any, input_names: list[str], output: str):
    import torch

    class _KeywordEncoder(torch.nn.Module):
        """Calls the model with keyword arguments and returns only the one output."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch_model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            outputs = self.encoder(**dict(zip(input_names, inputs, strict=True)), return_dict=True)
            return getattr(outputs, output)

    # eval(): the wrapper is a fresh module, and torch warns (and may trace dropout) otherwise.
    return _KeywordEncoder().eval()


def _example_inputs(torch_model: Any, input_names: list[str], batch: int, seq_len: int):
    import torch

    if batch < 1 or seq_len < 2:
        raise ValueError(f"export needs batch >= 1 and seq_len >= 2, got {batch=} {seq_len=}")
    # Example values only have to be in range: the axes are exported as dynamic, and the graph
    # does not depend on the values (no data-dependent control flow in these encoders).
    vocab = int(getattr(torch_model.config, "vocab_size", 100))
    generator = torch.Generator().manual_seed(0)
    values = {
        "input_ids": torch.randint(3, max(vocab, 4), (batch, seq_len), generator=generator),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.int64),
        "token_type_ids": torch.zeros(batch, seq_len, dtype=torch.int64),
    }
    # A real padding pattern keeps tracing away from any "no padding" shortcut in the model's
    # mask code (transformers drops the mask for SDPA when it sees it is all ones).
    values["attention_mask"][0, seq_len // 2 :] = 0
    return tuple(values[name] for name in input_names)


def export_encoder(
    torch_model: Any,
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    batch: int = 1,
    seq_len: int = 16,
    opset: int | None = None,
    output: str = OUTPUT_NAME,
) -> Path:
    """Export a Hugging Face encoder (BERT, DistilBERT, RoBERTa...) to ``path``; return the path.

    ``output``: the model output to export, ``last_hidden_state`` [B, S, D] (encoders) or
    ``logits`` [B, L] (task models such as ``...ForSequenceClassification``).

    ``batch`` and ``seq_len`` only size the example inputs used for tracing: both axes are
    dynamic in the result. ``opset`` defaults to each exporter's own default. The dynamo exporter
    may write the weights beside the model as ``<path>.data``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_model = torch_model.eval()
    input_names = input_names_for(torch_model)
    if output not in (OUTPUT_NAME, "logits"):
        raise ValueError(f"output must be '{OUTPUT_NAME}' or 'logits', got {output!r}")
    wrapper = _wrapper(torch_model, input_names, output)
    example = _example_inputs(torch_model, input_names, batch, seq_len)
    axes = {0: "batch", 1: "sequence"}
    output_axes = axes if output == OUTPUT_NAME else {0: "batch"}

    with torch.no_grad():
        if dynamo:
            batch_dim = torch.export.Dim("batch", min=1)
            seq_dim = torch.export.Dim("sequence", min=2)
            torch.onnx.export(
                wrapper,
                example,
                path,
                dynamo=True,
                input_names=input_names,
                output_names=[output],
                opset_version=opset,
                # One entry per positional input of the wrapper's *inputs.
                dynamic_shapes=(tuple({0: batch_dim, 1: seq_dim} for _ in input_names),),
            )
        else:
            torch.onnx.export(
                wrapper,
                example,
                path,
                dynamo=False,
                input_names=input_names,
                output_names=[output],
                opset_version=opset,
                dynamic_axes={**{name: axes for name in input_names}, output: output_axes},
            )

    # Check without loading weights: the dynamo exporter may have put them in external data.
    ir_version = onnx.load(path, load_external_data=False).ir_version
    if ir_version > MAX_ORT_IR_VERSION:
        raise RuntimeError(
            f"{path} has IR version {ir_version}; onnxruntime loads at most {MAX_ORT_IR_VERSION}"
        )
    return path
