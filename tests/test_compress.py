"""fastonnx.compress: block masks, the cubic schedule, distillation, export with the sparsity
check, and clear errors on bad input. Tiny random models only; no accuracy assertions."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastonnx.compress import (  # noqa: E402 - after the importorskip guards
    BlockPruner,
    CubicSchedule,
    DistillConfig,
    SparsityCheckError,
    check_onnx_sparsity,
    distillation_loss,
    export_pruned,
    prune_once,
    select_linear_layers,
    supported_block_shapes,
    train,
)
from fastonnx.compress.pruning import (  # noqa: E402
    TARGETS,
    check_block_shape_divides,
    nonzero_blocks,
    preferred_block_shape,
    resolve_block_shape,
)
from fastonnx.passes.lower_sparse import block_sparsity  # noqa: E402

HIDDEN, FFN, LAYERS = 64, 128, 2
ENCODER_LINEARS = 6 * LAYERS  # q, k, v, attention output, intermediate, output per layer


def tiny_classifier(seed: int = 0):
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=FFN,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_batches(count: int = 2, batch: int = 4, seq_len: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, 100, (batch, seq_len), generator=generator),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.int64),
            "labels": torch.randint(0, 2, (batch,), generator=generator),
        }
        for _ in range(count)
    ]


# Every shape the kernels accept, the local CPU's preferred one first: the tests that prune with
# the default shape must hold whatever it is (1x4 on AVX-512/AVX2, 16x64 or 16x4 on AMX).
BLOCKS = sorted(supported_block_shapes(), key=lambda b: b != preferred_block_shape())
BLOCK_IDS = [f"{r}x{c}" for r, c in BLOCKS]


def exact_sparsity(weights, block, sparsity: float) -> float:
    """What per-layer pruning to ``sparsity`` reaches: round(s * blocks) of each layer's blocks
    (so coarse shapes on small layers quantize the target), block-weighted over the layers."""
    counts = [nonzero_blocks(w, block).numel() for w in weights]
    return sum(round(sparsity * n) for n in counts) / sum(counts)


def zero_blocks(weight, block) -> tuple[int, int]:
    grid = nonzero_blocks(weight, block)
    return grid.numel() - int(grid.sum()), grid.numel()


def assert_whole_blocks(weight, block_mask, block) -> None:
    """Zeros of W are exactly the pruned blocks: kept blocks (random weights) have no zero."""
    r, c = block
    kept = block_mask.repeat_interleave(r, 0).repeat_interleave(c, 1)
    kept = kept[: weight.shape[0], : weight.shape[1]]
    assert torch.equal(weight != 0, kept), "zeros do not follow the block mask"


# --------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("block", supported_block_shapes(), ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_layer_masks_have_block_shape_and_exact_sparsity(block, sparsity):
    model = tiny_classifier()
    pruner = prune_once(model, sparsity, block_shape=block)
    masks = pruner.masks()
    assert len(masks) == ENCODER_LINEARS
    for name, weight in pruner.weights().items():
        zero, total = zero_blocks(weight, block)
        assert zero == round(sparsity * total), f"{name}: {zero}/{total} zero {block} blocks"
        assert_whole_blocks(weight, masks[name], block)
        # The sparse lowering counts the same blocks the same way.
        assert block_sparsity(weight.detach().numpy(), block) == pytest.approx(zero / total)


def test_global_scope_hits_the_total_not_each_layer():
    model = tiny_classifier()
    pruner = prune_once(model, 0.7, scope="global")
    layers = pruner.layer_sparsity()
    zero = sum(x.zero_blocks for x in layers)
    total = sum(x.blocks for x in layers)
    assert zero == round(0.7 * total)
    assert len({round(x.sparsity, 3) for x in layers}) > 1  # layers differ under one threshold


def test_norms_rank_blocks_differently():
    # Block A = [1, 1, 1, 1] (L1 4, L2 2), block B = [3, 0, 0, 0] (L1 3, L2 3): pruning one of
    # the two removes A by L2 and B by L1.
    linear = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 1, 1, 1, 3, 0, 0, 0]]))
    for norm, expected in (("l2", [0, 0, 0, 0, 3, 0, 0, 0]), ("l1", [1, 1, 1, 1, 0, 0, 0, 0])):
        model = torch.nn.Sequential(linear)
        weight = linear.weight.detach().clone()
        prune_once(model, 0.5, block_shape=(1, 4), norm=norm)
        assert linear.weight[0].tolist() == expected, norm
        with torch.no_grad():
            linear.weight.copy_(weight)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_default_selection_leaves_head_dense_and_patterns_select(block):
    model = tiny_classifier()
    names = list(select_linear_layers(model))
    assert len(names) == ENCODER_LINEARS
    assert not any("classifier" in n or "pooler" in n for n in names)
    attention = select_linear_layers(model, include=[r"\.attention\."])
    assert len(attention) == 4 * LAYERS
    pruner = prune_once(model, 0.9, block_shape=block)
    assert pruner.block_shape == block
    assert torch.count_nonzero(model.classifier.weight) == model.classifier.weight.numel()
    assert torch.count_nonzero(model.bert.pooler.dense.weight) > 0
    expected = exact_sparsity(pruner.weights().values(), block, 0.9)
    assert pruner.overall_sparsity() == pytest.approx(expected, abs=1e-9)
    assert abs(expected - 0.9) <= 0.5 / min(
        nonzero_blocks(w, block).numel() for w in pruner.weights().values()
    )


def test_default_block_shape_is_the_targets_preferred_one():
    model = tiny_classifier()
    pruner = BlockPruner(model, 0.5)  # no block shape, no target: this CPU
    assert pruner.target == "auto"
    assert pruner.block_shape == preferred_block_shape() == preferred_block_shape("auto")
    assert "target auto" in pruner.describe()
    for target in TARGETS:
        shape = preferred_block_shape(target)
        assert shape in supported_block_shapes(), target
        pruner = BlockPruner(model, 0.5, target=target)
        assert (pruner.target, pruner.block_shape) == (target, shape)
    # 1x4 everywhere: on AMX CPUs too, measured faster end to end and more accurate than 16x4
    # (docs/operators.md, Kernel paths).
    for target in ("avx512_vnni", "avx2", "amx"):
        assert preferred_block_shape(target) == (1, 4), target
    # An explicit shape wins over the target's preference.
    assert BlockPruner(model, 0.5, block_shape="4x4", target="amx").block_shape == (4, 4)
    assert resolve_block_shape("auto", "avx2") == (1, 4)


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown target CPU 'sse2'.*avx512_vnni"):
        BlockPruner(tiny_classifier(), 0.5, target="sse2")


def test_block_shape_must_divide_the_layers():
    model = tiny_classifier()
    layers = select_linear_layers(model)
    check_block_shape_divides(layers, (16, 64))  # 64 and 128 are multiples of both
    odd = torch.nn.Sequential(torch.nn.Linear(64, 30))
    with pytest.raises(ValueError, match=r"16x4 does not divide 1 layer.*\[30, 64\]"):
        check_block_shape_divides(select_linear_layers(odd), (16, 4))


def test_masks_survive_optimizer_steps():
    model = tiny_classifier()
    pruner = BlockPruner(model, 0.8)
    pruner.prune(0.8)
    before = {n: w.detach() == 0 for n, w in pruner.weights().items()}
    # Weight decay and Adam's moments would move zero-gradient weights without the hooks.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.attach(optimizer)
    model.train()
    for batch in tiny_batches(count=3):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        for name, weight in pruner.weights().items():
            assert not weight.grad[before[name]].any(), f"{name}: pruned weights got gradient"
        optimizer.step()
    pruner.detach()
    for name, weight in pruner.weights().items():
        assert torch.equal(weight.detach() == 0, before[name]), name


# --------------------------------------------------------------------------------------------
# Schedule


def test_fisher_criterion_ranks_by_weight_times_gradient():
    """A large block whose gradients are zero goes before a small one the loss depends on; the
    reference is the per-block sum of w^2 * mean(g^2) in NumPy."""
    linear = torch.nn.Linear(8, 2, bias=False)
    holder = torch.nn.Sequential(linear)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1.0, size=(2, 8)).astype(np.float32)
    w[:, :4] *= 4.0  # the first 1x4 block of each row is the largest by magnitude
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
    pruner = BlockPruner(holder, 0.5, block_shape=(1, 4), criterion="fisher")
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.0)
    pruner.attach(optimizer)
    grads = []
    for _ in range(3):
        x = torch.from_numpy(rng.normal(size=(5, 8)).astype(np.float32))
        x[:, :4] = 0.0  # the loss never sees the first block: its gradients are zero
        optimizer.zero_grad()
        linear(x).pow(2).sum().backward()
        grads.append(linear.weight.grad.numpy().copy())
        optimizer.step()
    pruner.prune(0.5)
    pruner.detach()
    fisher = (w**2 * np.mean(np.square(grads), axis=0)).reshape(2, 2, 4).sum(-1)
    keep = pruner.masks()["0"].numpy()
    assert keep.tolist() == (fisher == fisher.max(axis=1, keepdims=True)).tolist()
    assert keep.tolist() == [[False, True], [False, True]]  # magnitude would keep the first
    magnitude = prune_once(copy_linear(w), 0.5, block_shape=(1, 4))
    assert magnitude.masks()["0"].tolist() == [[True, False], [True, False]]


def copy_linear(w):
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
    return torch.nn.Sequential(linear)


def test_fisher_criterion_without_gradients_is_magnitude():
    w = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    fisher = prune_once(copy_linear(w), 0.5, block_shape=(1, 4), criterion="fisher")
    magnitude = prune_once(copy_linear(w), 0.5, block_shape=(1, 4))
    assert torch.equal(fisher.masks()["0"], magnitude.masks()["0"])


def test_unknown_criterion():
    with pytest.raises(ValueError, match="unknown criterion 'movement'; choose from"):
        BlockPruner(tiny_classifier(), 0.5, criterion="movement")


def test_cubic_schedule_values():
    schedule = CubicSchedule(final_sparsity=0.9, begin_step=10, end_step=110, frequency=10)
    assert schedule(0) == 0.0
    assert schedule(10) == 0.0  # s_i
    assert schedule(60) == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule(69) == schedule(60)  # held between updates
    assert schedule(70) == pytest.approx(0.9 * (1 - 0.4**3))
    assert schedule(110) == schedule(500) == 0.9
    values = [schedule(t) for t in range(0, 120)]
    assert values == sorted(values)
    ramp = CubicSchedule(final_sparsity=0.8, initial_sparsity=0.2, begin_step=0, end_step=4)
    assert ramp(0) == pytest.approx(0.2)
    assert ramp(2) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5**3)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_pruner_follows_schedule_with_nested_masks(block):
    model = tiny_classifier()
    schedule = CubicSchedule(0.9, begin_step=0, end_step=6, frequency=2)
    pruner = BlockPruner(model, schedule, block_shape=block)
    previous = None
    for step in range(8):
        pruner.update(step)
        expected = exact_sparsity(pruner.weights().values(), block, pruner.schedule(step))
        assert pruner.overall_sparsity() == pytest.approx(expected, abs=1e-9), step
        zeros = {n: w.detach() == 0 for n, w in pruner.weights().items()}
        if previous is not None:  # once pruned, a block stays pruned
            assert all(torch.all(zeros[n] | ~previous[n]) for n in zeros)
        previous = zeros
    expected = exact_sparsity(pruner.weights().values(), block, 0.9)
    assert pruner.overall_sparsity() == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------------------------
# Distillation


def test_distillation_loss_formula():
    student = SimpleNamespace(logits=torch.tensor([[1.0, -1.0], [0.5, 0.2]]))
    teacher = SimpleNamespace(logits=torch.tensor([[2.0, 0.0], [-1.0, 1.0]]))
    labels = torch.tensor([0, 1])
    config = DistillConfig(temperature=3.0, alpha_task=0.3, alpha_kd=0.7)
    parts = distillation_loss(student, teacher, labels, config)
    ce = torch.nn.functional.cross_entropy(student.logits, labels)
    p_t = torch.softmax(teacher.logits / 3, -1)
    log_p_s = torch.log_softmax(student.logits / 3, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 9
    assert parts.task == pytest.approx(float(ce), rel=1e-5)
    assert parts.kd == pytest.approx(float(kl), rel=1e-5)
    assert float(parts.total) == pytest.approx(0.3 * float(ce) + 0.7 * float(kl), rel=1e-5)


def test_distillation_loss_decreases_while_pruning():
    teacher = tiny_classifier(seed=1)
    student = tiny_classifier(seed=2)
    pruner = BlockPruner(student, CubicSchedule(0.5, begin_step=0, end_step=4, frequency=2))
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    config = DistillConfig(alpha_task=0.0, alpha_kd=1.0, alpha_hidden=0.1)
    lines = []
    result = train(
        student,
        teacher,
        tiny_batches(count=2),
        steps=16,
        optimizer=optimizer,
        pruner=pruner,
        config=config,
        log_every=4,
        log=lines.append,
    )
    assert len(result.losses) == 16 and len(lines) == 4
    assert "sparsity" in lines[-1] and "s/step" in lines[-1]
    assert np.mean(result.losses[-3:]) < result.losses[0]
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert not pruner._hooks, "train() must detach the pruner"


def test_hidden_state_distillation_needs_matching_shapes():
    student = SimpleNamespace(logits=torch.zeros(2, 2), hidden_states=(torch.zeros(2, 3, 8),))
    teacher = SimpleNamespace(logits=torch.zeros(2, 2), hidden_states=(torch.zeros(2, 3, 16),))
    with pytest.raises(ValueError, match="matching shapes"):
        distillation_loss(student, teacher, None, DistillConfig(alpha_task=0, alpha_hidden=1))


# --------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory):
    model = tiny_classifier()
    pruner = prune_once(model, 0.8)
    path = tmp_path_factory.mktemp("pruned") / "model.onnx"
    return model, pruner, export_pruned(model, path, pruner)


def test_sparsity_survives_export(pruned_export):
    model, pruner, exported = pruned_export
    assert exported.output == "logits"
    assert len(exported.layers) == ENCODER_LINEARS
    expected = {x.name: x.zero_blocks for x in pruner.layer_sparsity()}
    assert {x.layer: x.measured.zero_blocks for x in exported.layers} == expected


def test_exported_logits_match_torch(pruned_export):
    import onnxruntime as ort

    model, _, exported = pruned_export
    batch = tiny_batches(count=1, batch=3, seq_len=7, seed=5)[0]
    batch["attention_mask"][1, 4:] = 0
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    feeds = {k: v.numpy() for k, v in batch.items() if k != "labels"}
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.numpy()
    np.testing.assert_allclose(session.run(["logits"], feeds)[0], expected, atol=1e-4)


def test_sparsity_check_catches_a_changed_weight(pruned_export):
    _, pruner, exported = pruned_export
    weights = {n: w.detach().clone() for n, w in pruner.weights().items()}
    name = next(iter(weights))
    weights[name][0, :4] = 0.5  # revive a block the file has as zero (or change its values)
    with pytest.raises(SparsityCheckError, match="not found"):
        check_onnx_sparsity(exported.path, weights, pruner.block_shape)


def test_legacy_exporter_keeps_sparsity(tmp_path):
    model = tiny_classifier(seed=3)
    pruner = prune_once(model, 0.9, block_shape=(4, 4))
    exported = export_pruned(model, tmp_path / "legacy.onnx", pruner, dynamo=False)
    assert exported.exporter == "legacy"
    assert all(math.isclose(x.measured.sparsity, 0.9, abs_tol=2e-3) for x in exported.layers)


# --------------------------------------------------------------------------------------------
# Bad input


def test_unsupported_block_shape_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"3x3 is not supported.*1x4"):
        BlockPruner(tiny_classifier(), 0.5, block_shape=(3, 3))
    with pytest.raises(ValueError, match="RxC"):
        BlockPruner(tiny_classifier(), 0.5, block_shape="four")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        BlockPruner(tiny_classifier(), sparsity)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CubicSchedule(final_sparsity=sparsity, end_step=10)


def test_model_without_linear_layers():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        BlockPruner(model, 0.5)
    with pytest.raises(ValueError, match="left after include"):
        BlockPruner(tiny_classifier(), 0.5, include=["no-such-layer"])


def test_bad_schedule_and_config():
    with pytest.raises(ValueError, match="begin_step <= end_step"):
        CubicSchedule(0.5, begin_step=10, end_step=5)
    with pytest.raises(ValueError, match="frequency"):
        CubicSchedule(0.5, end_step=5, frequency=0)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)


def test_import_without_torch_fails_only_when_used():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import fastonnx, fastonnx.compress as c
assert c.CubicSchedule(0.9, end_step=10)(10) == 0.9
try:
    c.BlockPruner(object(), 0.5)
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'fastonnx[train]'" in out.stdout


def test_unlabeled_rows_learn_from_the_teacher_only():
    student = SimpleNamespace(logits=torch.tensor([[1.0, -1.0], [0.5, 0.2], [0.0, 2.0]]))
    teacher = SimpleNamespace(logits=torch.tensor([[2.0, 0.0], [-1.0, 1.0], [1.0, 1.0]]))
    config = DistillConfig(temperature=2.0, alpha_task=0.5, alpha_kd=0.5)
    mixed = distillation_loss(student, teacher, torch.tensor([0, -100, 1]), config)
    ce = torch.nn.functional.cross_entropy(student.logits[[0, 2]], torch.tensor([0, 1]))
    assert mixed.task == pytest.approx(float(ce), rel=1e-6)  # the -100 row has no task loss
    unlabeled = distillation_loss(student, teacher, torch.full((3,), -100), config)
    assert unlabeled.task == 0.0
    assert float(unlabeled.total) == pytest.approx(0.5 * unlabeled.kd, rel=1e-6)
    assert unlabeled.kd == pytest.approx(mixed.kd)


def test_pruner_state_round_trips():
    model = tiny_classifier()
    pruner = prune_once(model, 0.6, block_shape=(1, 4))
    state = pruner.state_dict()
    other = tiny_classifier(seed=5)
    restored = BlockPruner(other, 0.6, block_shape=(1, 4))
    restored.load_state_dict(state)
    assert restored.sparsity == 0.6
    for name, mask in pruner.masks().items():
        assert torch.equal(restored.masks()[name], mask), name
        assert torch.equal(restored.weights()[name] == 0, ~expand(mask)), name
    with pytest.raises(ValueError, match="block shape"):
        BlockPruner(other, 0.6, block_shape=(4, 4)).load_state_dict(state)


def test_pruner_state_carries_fisher_gradients():
    def gathered(model):
        pruner = BlockPruner(model, 0.5, block_shape=(1, 4), criterion="fisher")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner.attach(optimizer)
        for batch in tiny_batches(2):
            optimizer.zero_grad()
            model(**batch).loss.backward()
        pruner.detach()
        return pruner

    pruner = gathered(tiny_classifier())
    state = pruner.state_dict()
    assert set(state["grad_count"].values()) == {2}
    restored = BlockPruner(tiny_classifier(), 0.5, block_shape=(1, 4), criterion="fisher")
    restored.load_state_dict(state)
    plain = BlockPruner(tiny_classifier(), 0.5, block_shape=(1, 4), criterion="fisher")
    for p in (pruner, restored, plain):
        p.prune(0.5)
    masks = pruner.masks()
    assert all(torch.equal(restored.masks()[n], m) for n, m in masks.items())
    # Without the gradients the ranking falls back to magnitude, which differs.
    assert not all(torch.equal(plain.masks()[n], m) for n, m in masks.items())
    assert "grad_sq" not in pruner.state_dict()  # used up by the prune


def expand(mask):
    return mask.repeat_interleave(4, dim=1)
