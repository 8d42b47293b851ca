"""Tiny random-weight encoders and their ONNX exports, for fusion and export tests.

Every combination of family (BERT, DistilBERT, RoBERTa), attention implementation (eager, sdpa)
and exporter (dynamo, legacy TorchScript) is built and exported at most once per test session
through :class:`ExportCache` (the ``encoder_exports`` fixture in ``conftest.py``).

Weights are re-drawn after construction: Hugging Face initialises biases to 0 and LayerNorm
scales to 1, and the dynamo exporter then shares one all-zero initializer between every bias,
which would let a fusion that drops or swaps a bias pass the numeric checks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

FAMILIES = ("bert", "distilbert", "roberta")
ATTENTIONS = ("eager", "sdpa")
EXPORTERS = ("dynamo", "legacy")

NUM_LAYERS = 2
HIDDEN = 64
HEADS = 4
INTERMEDIATE = 128
VOCAB = 1000
MAX_POSITIONS = 64


@dataclasses.dataclass(frozen=True)
class Combo:
    """One point of the export matrix."""

    family: str
    attention: str
    exporter: str
    opset: int | None = None  # None: the exporter's default

    def __str__(self) -> str:
        opset = f"-opset{self.opset}" if self.opset is not None else ""
        return f"{self.family}-{self.attention}-{self.exporter}{opset}"


MATRIX = tuple(Combo(f, a, e) for f in FAMILIES for a in ATTENTIONS for e in EXPORTERS)
# Before opset 17 (LayerNormalization) and 20 (Gelu), the legacy exporter decomposes both ops,
# which exercises the LayerNorm and Erf-GELU fusions on real exports.
DECOMPOSED = tuple(Combo(f, "eager", "legacy", opset=14) for f in FAMILIES)


@dataclasses.dataclass(frozen=True)
class Exported:
    combo: Combo
    path: Path
    torch_model: object
    num_layers: int
    pad_token_id: int
    input_names: tuple[str, ...]


def build_encoder(family: str, attention: str, seed: int = 0):
    """A tiny random-weight Hugging Face encoder in eval mode."""
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS)
    if family == "bert":
        config = transformers.BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            **common,
        )
        model_class = transformers.BertModel
    elif family == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, hence two extra position slots; a single
        # token type, as in roberta-base.
        config = transformers.RobertaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            type_vocab_size=1,
            pad_token_id=1,
            **{**common, "max_position_embeddings": MAX_POSITIONS + 2},
        )
        model_class = transformers.RobertaModel
    elif family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=HIDDEN, n_layers=NUM_LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE, **common
        )
        model_class = transformers.DistilBertModel
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config._attn_implementation = attention
    torch.manual_seed(seed)
    kwargs = {} if family == "distilbert" else {"add_pooling_layer": False}
    model = model_class(config, **kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            # LayerNorm scales around 1, everything else around 0.
            base = 1.0 if "LayerNorm.weight" in name or "layer_norm.weight" in name else 0.0
            param.copy_(base + noise)
    return model


def encoder_inputs(
    input_names: tuple[str, ...], pad_token_id: int, batch: int = 2, seq_len: int = 9, seed: int = 1
) -> dict[str, np.ndarray]:
    """Inputs with real padding: sequence 0 is full, the others end in padding."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, VOCAB, size=(batch, seq_len), dtype=np.int64)
    attention_mask = np.ones((batch, seq_len), dtype=np.int64)
    for row in range(1, batch):
        length = max(1, seq_len - 2 * row - 1)
        attention_mask[row, length:] = 0
        input_ids[row, length:] = pad_token_id
    values = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (np.arange(seq_len)[None, :] >= seq_len // 2).astype(np.int64)
        * np.ones((batch, 1), dtype=np.int64),
    }
    return {name: values[name] for name in input_names}


class ExportCache:
    """Exports each combination once, into ``root``; ``get`` returns the cached export."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._exports: dict[Combo, Exported] = {}
        self._models: dict[tuple[str, str], object] = {}

    def model(self, family: str, attention: str):
        key = (family, attention)
        if key not in self._models:
            self._models[key] = build_encoder(family, attention)
        return self._models[key]

    def get(self, combo: Combo) -> Exported:
        if combo not in self._exports:
            from fastonnx.export import export_encoder, input_names_for

            torch_model = self.model(combo.family, combo.attention)
            path = export_encoder(
                torch_model,
                self._root / str(combo) / "model.onnx",
                dynamo=combo.exporter == "dynamo",
                opset=combo.opset,
            )
            self._exports[combo] = Exported(
                combo=combo,
                path=path,
                torch_model=torch_model,
                num_layers=NUM_LAYERS,
                pad_token_id=torch_model.config.pad_token_id or 0,
                input_names=tuple(input_names_for(torch_model)),
            )
        return self._exports[combo]


def run_ort(model: str | Path | bytes, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of a model run in ONNX Runtime on one CPU thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # unused-initializer notices are not interesting here
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def run_torch(torch_model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        tensors = {name: torch.from_numpy(value) for name, value in inputs.items()}
        return torch_model(**tensors).last_hidden_state.numpy()
