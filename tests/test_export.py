"""export_encoder: inputs, dynamic axes, IR version, and agreement with PyTorch under ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from encoders import EXPORTERS, FAMILIES, Combo, build_encoder, encoder_inputs, run_ort, run_torch

from fastonnx.export import MAX_ORT_IR_VERSION, OUTPUT_NAME, export_encoder

TOLERANCE = 1e-4
# transformers' default attention; the fusion tests cover eager as well.
COMBOS = tuple(Combo(family, "sdpa", exporter) for family in FAMILIES for exporter in EXPORTERS)
EXPECTED_INPUTS = {
    "bert": ("input_ids", "attention_mask", "token_type_ids"),
    "distilbert": ("input_ids", "attention_mask"),  # DistilBERT has no token types
    "roberta": ("input_ids", "attention_mask"),  # one token type: nothing to feed
}


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_export_signature_and_axes(encoder_exports, combo):
    exported = encoder_exports.get(combo)
    proto = onnx.load(exported.path, load_external_data=False)
    assert proto.ir_version <= MAX_ORT_IR_VERSION
    names = tuple(value.name for value in proto.graph.input)
    assert names == EXPECTED_INPUTS[combo.family]
    assert [value.name for value in proto.graph.output] == [OUTPUT_NAME]
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        # Batch and sequence are symbolic, not the traced example's 1 x 16.
        assert dims[0].dim_param and dims[1].dim_param, f"{value.name} has static B/S"


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_export_matches_torch(encoder_exports, combo):
    exported = encoder_exports.get(combo)
    # A batch and length other than the traced ones, with padding in all but the first row.
    feeds = encoder_inputs(exported.input_names, exported.pad_token_id, batch=3, seq_len=11)
    expected = run_torch(exported.torch_model, feeds)
    actual = run_ort(exported.path, feeds)
    assert actual.shape == expected.shape == (3, 11, 64)
    diff = float(np.abs(actual - expected).max())
    assert diff <= TOLERANCE, f"max abs diff {diff} > {TOLERANCE}"


def test_export_rejects_degenerate_example(tmp_path):
    pytest.importorskip("torch")
    model = build_encoder("distilbert", "sdpa")
    with pytest.raises(ValueError, match="seq_len >= 2"):
        export_encoder(model, tmp_path / "model.onnx", seq_len=1)
