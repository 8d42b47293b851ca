"""Training batches grouped by length (pure Python: usable and testable without torch).

Batches are padded to their longest sentence, so a random batch of short sentences pays for
its one long one: on the demo's sentences (27 tokens on average) random batches of 32 pad to
53 tokens, length-grouped ones to about 28, which makes a training step about 1.8x cheaper.
Sentences are sorted by length with seeded random tie-breaks and cut into batches, and the
batch order is shuffled, so each batch mixes examples of one length from across the data set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int | None = None
) -> list[list[int]]:
    """Index batches of ``batch_size`` (the last may be smaller) of examples with similar
    ``lengths``, in a seeded random order; every index appears exactly once. Without ``seed``:
    sorted by length, ties in index order (deterministic, for evaluation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must be >= 0")
    rng = random.Random(seed) if seed is not None else None
    ties = [rng.random() for _ in lengths] if rng else list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], ties[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def random_batches(count: int, batch_size: int, seed: int | None = None) -> list[list[int]]:
    """Index batches of ``batch_size`` over ``range(count)``: shuffled with ``seed``, in order
    without."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(count))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
