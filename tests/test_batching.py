"""fastonnx.compress.batching: length-grouped and random index batches."""

from __future__ import annotations

import random

import pytest

from fastonnx.compress.batching import length_grouped_batches, random_batches


def _lengths(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 60) for _ in range(count)]


@pytest.mark.parametrize("count", [0, 1, 31, 32, 33, 1000])
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_every_index_once_and_batch_sizes(count, batch_size):
    lengths = _lengths(count)
    for batches in (
        length_grouped_batches(lengths, batch_size, seed=3),
        random_batches(count, batch_size, seed=3),
    ):
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(count))
        sizes = sorted(len(b) for b in batches)
        full, rest = divmod(count, batch_size)
        assert sizes == sorted([batch_size] * full + ([rest] if rest else []))


def test_grouping_cuts_padding():
    lengths = _lengths(3200)
    padded = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches)  # noqa: E731
    grouped = length_grouped_batches(lengths, 32, seed=0)
    shuffled = random_batches(len(lengths), 32, seed=0)
    # Sorted by length, a batch spans one or two lengths: padding is at most a few tokens.
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 1 for b in grouped)
    assert padded(grouped) < 0.6 * padded(shuffled)


def test_seeded_and_shuffled():
    lengths = _lengths(500)
    a = length_grouped_batches(lengths, 16, seed=1)
    assert a == length_grouped_batches(lengths, 16, seed=1)
    assert a != length_grouped_batches(lengths, 16, seed=2)
    # The batch order is shuffled, not shortest first.
    firsts = [lengths[b[0]] for b in a]
    assert firsts != sorted(firsts)
    # Without a seed: sorted by length, ties in index order.
    plain = [i for b in length_grouped_batches(lengths, 16) for i in b]
    assert plain == sorted(range(500), key=lambda i: (lengths[i], i))


def test_random_batches_match_a_seeded_shuffle():
    order = list(range(100))
    random.Random(5).shuffle(order)
    assert [i for b in random_batches(100, 8, seed=5) for i in b] == order
    assert [i for b in random_batches(10, 4) for i in b] == list(range(10))


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        length_grouped_batches([1, 2], bad)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        random_batches(2, bad)


def test_negative_length():
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        length_grouped_batches([3, -1], 2)
