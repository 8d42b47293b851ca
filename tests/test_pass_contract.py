"""Every pass has one shape (fastonnx.passes.base): an onnx_ir in-place pass returning a Result
whose Report counts changes only and lists what it left alone with the reason."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from fastonnx import optimizer
from fastonnx.passes.base import Pass, Report, Result, Skip


@pytest.mark.parametrize("preset", sorted(optimizer.PRESETS))
def test_presets_are_lists_of_configured_passes(preset):
    pytest.importorskip("fastonnx._native")
    ctx = optimizer._Context(preset, [], optimizer.QuantizeConfig(), None, packing=False)

    passes = optimizer.build_passes(ctx)

    assert [p.name for p in passes] == list(optimizer.PRESETS[preset])
    assert all(isinstance(p, Pass) and p.in_place for p in passes)
    fuse = passes[0]
    assert fuse.skip_layer_norm == ("lower_sparse" not in optimizer.PRESETS[preset])


def test_a_pass_returns_its_report_and_modified_follows_it(tiny_bert):
    pytest.importorskip("fastonnx._native")
    from fastonnx.passes.fusion import FusePass
    from fastonnx.passes.lower_sparse import LowerSparsePass

    model = ir.load(tiny_bert)
    fused = FusePass()(model)
    assert isinstance(fused, Result) and fused.model is model
    assert fused.modified and fused.report.fused and fused.report.counts["attention"] == 2

    # Not quantized yet: nothing is lowered, and each layer says why.
    kept = LowerSparsePass(min_sparsity=0.5)(model)
    assert not kept.modified and not kept.report.changed
    assert kept.report.counts == {"SparseLinear": 0}
    assert kept.report.skipped and all(isinstance(s, Skip) for s in kept.report.skipped)
    assert all("run the int8 preset first" in s.reason for s in kept.report.skipped)


def test_optimize_records_every_pass_with_its_report(tiny_bert):
    pytest.importorskip("fastonnx._native")
    result = optimizer.optimize(tiny_bert, preset="sparse-int8", min_sparsity=0.5, num_samples=2)

    records = result.report.passes
    assert [r.name for r in records] == list(optimizer.PRESETS["sparse-int8"])
    for record in records:
        assert isinstance(record.details, Report)
        assert record.counts == record.details.counts
        assert not any("skipped" in key or "kept" in key for key in record.counts)
    changed = {r.name: r.details.changed for r in records}
    assert changed["quantize"] and not changed["lower_sparse"]
    assert result.report.changed
    assert len(result.report.quantize_skipped) == len(records[1].details.skipped)
