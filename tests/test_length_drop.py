"""LengthDrop training (fastonnx.compress.length_drop): the PyTorch token selection against the
SelectTokens rules, the dropping forward pass against a sequence-by-sequence reference, the
sandwich-rule training step, and bad settings."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastonnx.compress import train  # noqa: E402
from fastonnx.compress.length_drop import (  # noqa: E402
    LengthDrop,
    TokenDropper,
    key_scores,
    select,
    tokens_kept,
)


def tiny_classifier(layers: int = 3, seed: int = 0):
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def batch(lengths, width=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reference_rows(scores, n, share):
    """SelectTokens' rule for one sequence of n tokens: the first, then the best scores (ties:
    earlier first), ceil(share * n) in all, in position order."""
    k = tokens_kept(n, share)
    rest = sorted(range(1, n), key=lambda i: (-float(scores[i]), i))
    return sorted([0, *rest[: k - 1]])


@pytest.mark.parametrize("n, share, k", [(0, 0.5, 0), (1, 0.1, 1), (10, 0.7, 7), (7, 0.5, 4)])
def test_tokens_kept_matches_the_kernel_rule(n, share, k):
    assert tokens_kept(n, share) == k


@pytest.mark.parametrize("share", [1.0, 0.8, 0.5, 0.2])
def test_select_matches_the_reference(share):
    generator = torch.Generator().manual_seed(int(share * 10))
    lengths = [9, 1, 5, 12]
    valid = torch.zeros(4, 12, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, :n] = True
    scores = torch.randn(4, 12, generator=generator)
    scores[0, 3:6] = 0.5  # ties
    scores[3, 0] = -100.0  # the first token is kept whatever its score
    rows, kept = select(scores, valid, share)
    for row, n in enumerate(lengths):
        expected = reference_rows(scores[row], n, share)
        assert kept[row].sum() == len(expected)
        assert rows[row, : len(expected)].tolist() == expected


def test_select_rejects_left_padding():
    valid = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="right-padded"):
        select(torch.zeros(1, 3), valid, 0.5)


def test_key_scores_sum_heads_and_valid_queries_only():
    probs = torch.rand(2, 3, 4, 4)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    expected = torch.stack(
        [probs[b, :, : int(valid[b].sum()), :].sum(dim=(0, 1)) for b in range(2)]
    )
    torch.testing.assert_close(key_scores(probs, valid), expected)


def test_full_length_is_the_model_and_restores_the_attention():
    model = tiny_classifier()
    inputs = batch([12, 7, 3])
    before = model.config._attn_implementation
    expected = model(**inputs).logits
    with torch.no_grad(), TokenDropper(model) as dropper:
        torch.testing.assert_close(dropper(None, **inputs).logits, expected, atol=1e-5, rtol=0)
        ones = dropper([1.0, 1.0], **inputs).logits
        torch.testing.assert_close(ones, expected, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == before
    torch.testing.assert_close(model(**inputs).logits, expected)  # hooks removed


def reference_logits(model, inputs, shares):
    """Sequence by sequence, no padding: each layer's attention probabilities pick the tokens
    the next layer runs on."""
    bert, out = model.bert, []
    for row in range(inputs["input_ids"].shape[0]):
        n = int(inputs["attention_mask"][row].sum())
        hidden = bert.embeddings(input_ids=inputs["input_ids"][row : row + 1, :n])
        for index, layer in enumerate(bert.encoder.layer):
            attention = layer.attention.self
            captured = {}
            handle = attention.register_forward_hook(
                lambda _m, _a, output, into=captured: into.update(probs=output[1])
            )
            hidden = layer(hidden)
            handle.remove()
            if index < len(shares):
                scores = captured["probs"][0].sum(dim=(0, 1))
                keep = reference_rows(scores, hidden.shape[1], shares[index])
                hidden = hidden[:, keep]
        out.append(model.classifier(bert.pooler(hidden)))
    return torch.cat(out)


@pytest.mark.parametrize("shares", [[0.5, 0.5], [1.0, 0.3], [0.7, 1.0], [0.1, 0.1]])
def test_dropping_matches_a_sequence_by_sequence_reference(shares):
    model = tiny_classifier()
    model.set_attn_implementation("eager")
    inputs = batch([12, 7, 1, 4, 10], seed=1)
    with torch.no_grad():
        expected = reference_logits(model, inputs, shares)
        with TokenDropper(model) as dropper:
            got = dropper(shares, **inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The reference does drop tokens: full length differs far more than the two agree.
    full = model(**inputs).logits
    assert (full - expected).abs().max() > 10 * (got - expected).abs().max() + 1e-7


def test_configurations_are_the_sandwich_and_reproducible():
    settings = LengthDrop(max_drop=0.3, sub_models=2, seed=5)
    configs = settings.configurations(4, step=7)
    assert configs[0] == [0.7, 0.7, 0.7]
    assert len(configs) == 3 and all(len(c) == 3 for c in configs)
    assert all(0.7 <= s <= 1.0 for c in configs for s in c)
    assert settings.configurations(4, step=7) == configs
    assert settings.configurations(4, step=8) != configs


def test_training_with_length_drop_trains_the_sub_models():
    """Against the same training without it, LengthDrop shrinks the gap between a dropping
    sub-model's predictions and the full model's."""
    labels = torch.tensor([0, 1, 2, 1])
    batches = [{**batch([12, 9, 6, 12], seed=s), "labels": labels.roll(s)} for s in range(4)]
    shares = [0.4, 0.4]

    def trained(length_drop):
        model = tiny_classifier(seed=2)
        logs = []
        result = train(
            model,
            None,
            batches,
            steps=40,
            optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
            length_drop=length_drop,
            log_every=10,
            log=logs.append,
        )
        assert all(math.isfinite(x) for x in result.losses)
        return model, logs

    def gap(model):
        total = 0.0
        with torch.no_grad(), TokenDropper(model) as dropper:
            for b in batches:
                inputs = {k: v for k, v in b.items() if k != "labels"}
                full = torch.softmax(model(**inputs).logits, -1)
                dropped = torch.log_softmax(dropper(shares, **inputs).logits, -1)
                total += float(torch.nn.functional.kl_div(dropped, full, reduction="batchmean"))
        return total

    plain, plain_logs = trained(None)
    sandwich, logs = trained(LengthDrop(max_drop=0.6, sub_models=1))
    assert "length" in logs[-1] and "length" not in plain_logs[-1]
    assert gap(sandwich) < 0.5 * gap(plain), (gap(sandwich), gap(plain))
    assert sandwich.config._attn_implementation == plain.config._attn_implementation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_drop": 0.0}, "max_drop"),
        ({"max_drop": 1.0}, "max_drop"),
        ({"sub_models": -1}, "sub_models"),
        ({"alpha": 0.0}, "alpha"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthDrop(**kwargs)


def test_bad_length_configuration():
    with TokenDropper(tiny_classifier()) as dropper:
        with pytest.raises(ValueError, match="one share per layer but the last: 2"):
            dropper([0.5], **batch([3]))
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            dropper([0.5, 0.0], **batch([3]))


def test_model_without_encoder_layers():
    with pytest.raises(ValueError, match="no encoder layer list"):
        TokenDropper(torch.nn.Linear(2, 2))
