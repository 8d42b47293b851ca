"""LengthDrop training for length-adaptive inference (Kim & Cho, Length-Adaptive Transformer, 2021).

At inference :mod:`fastonnx.passes.drop_tokens` lets layer l+1 run on a share of the tokens
layer l ran on: each sequence of n tokens keeps ``ceil(share * n)``, its first token always,
then those that received the most attention in layer l (summed over heads and valid queries).
A model trained at full length loses accuracy when it drops tokens; LengthDrop trains it to
run at any length configuration:

* :class:`TokenDropper` reproduces that selection in PyTorch with hooks on the encoder layers
  (BERT, RoBERTa, MiniLM, DistilBERT), for a length configuration set per forward pass;
* :class:`LengthDrop` holds the sandwich rule's settings: each step trains the full-length
  model (on the usual loss), the smallest sub-model (every layer keeps ``1 - max_drop``) and
  ``sub_models`` random ones (layer l keeps a share drawn from U(1 - max_drop, 1)); the
  sub-models learn from the full model's logits (in-place distillation).

Dimension letters: B batch, S tokens a layer runs on, H heads, K tokens the next layer keeps
(the longest kept sequence; shorter ones are padded and masked).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastonnx.compress._deps import require_torch

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LengthDrop:
    """Sandwich-rule settings. ``max_drop``: the most a layer drops of the tokens it gets (the
    LAT paper's p; 0.2 keeps shares in [0.8, 1]). ``alpha``: weight of the sub-models' loss."""

    max_drop: float = 0.2
    sub_models: int = 2
    alpha: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.max_drop < 1.0:
            raise ValueError(f"max_drop must be in (0, 1), got {self.max_drop}")
        if self.sub_models < 0:
            raise ValueError(f"sub_models must be >= 0, got {self.sub_models}")
        if self.alpha <= 0 or self.temperature <= 0:
            raise ValueError(
                f"alpha and temperature must be > 0, got {self.alpha} and {self.temperature}"
            )

    def configurations(self, layers: int, step: int) -> list[list[float]]:
        """The sub-models of training step ``step``: the smallest, then ``sub_models`` random
        ones, drawn from (seed, step) so a resumed run draws what an uninterrupted one would."""
        rng = random.Random(f"{self.seed}:{step}")
        smallest = [round(1.0 - self.max_drop, 6)] * (layers - 1)
        drawn = [
            [round(1.0 - rng.uniform(0.0, self.max_drop), 6) for _ in range(layers - 1)]
            for _ in range(self.sub_models)
        ]
        return [smallest, *drawn]


def tokens_kept(n: int, share: float) -> int:
    """As the SelectTokens kernel: ceil(share * n) within [1, n] (0 for n = 0)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(share * n - 1e-9)))


def encoder_layers(model: Any) -> Sequence[Any]:
    """The encoder's layer list (``encoder.layer`` in BERT/RoBERTa, ``transformer.layer`` in
    DistilBERT), found under the model's base module."""
    torch = require_torch()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layer" and isinstance(module, torch.nn.ModuleList):
            parent = name.rsplit(".", 2)[-2] if "." in name else ""
            if parent in ("encoder", "transformer"):
                return module
    raise ValueError(
        f"{type(model).__name__}: no encoder layer list (encoder.layer or transformer.layer) "
        "found; LengthDrop supports BERT, RoBERTa, MiniLM and DistilBERT models"
    )


def _self_attention(layer: Any) -> Any:
    """The module of ``layer`` that returns (output, attention probabilities [B, H, S, S])."""
    found = [m for m in layer.modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]
    if len(found) != 1:
        raise ValueError(
            f"{type(layer).__name__}: expected one self-attention module, found {len(found)}"
        )
    return found[0]


def key_scores(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention each key receives [B, S]: ``probs`` [B, H, S, S] summed over heads and the
    valid queries (``valid`` [B, S] bool), as the Attention op's second output."""
    weights = valid.to(probs.dtype)[:, None, :, None]
    return (probs * weights).sum(dim=(1, 2))


def select(scores: torch.Tensor, valid: torch.Tensor, share: float):
    """(rows [B, K] int64, kept [B, K] bool): per sequence the first valid token and the
    highest-scoring others (ties: the earlier position), ``tokens_kept(n, share)`` of them, in
    position order; slots past a sequence's count are padding (``kept`` False)."""
    torch = require_torch()
    batch, length = scores.shape
    if batch and not bool(valid[:, 0].all()):
        raise ValueError("LengthDrop needs right-padded batches (every first token valid)")
    counts = [tokens_kept(int(n), share) for n in valid.sum(dim=1).tolist()]
    width = max(1, max(counts))
    ranked = scores.detach().float().nan_to_num(nan=-math.inf).clone()
    # Valid tokens outrank padding and the first token outranks all: index 0 is its position,
    # as sequences start at position 0 (right padding).
    ranked = torch.where(valid, ranked, torch.full_like(ranked, -math.inf))
    ranked[:, 0] = math.inf
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :width]
    slot = torch.arange(width, device=scores.device)[None, :]
    kept = slot < torch.tensor(counts, device=scores.device)[:, None]
    # Kept rows in position order; padding slots sort to the end.
    rows = torch.where(kept, order, torch.full_like(order, length))
    rows = torch.sort(rows, dim=1).values.clamp(max=length - 1)
    return rows, kept


class TokenDropper:
    """Hooks that make ``model``'s encoder drop tokens after each layer; ``shares`` (one per
    layer but the last, or None for full length) applies to the next forward passes.

    The model must use eager attention (its probabilities are the selection scores):
    construction switches it, :meth:`close` restores the previous implementation. A context
    manager. Outputs of layers after a dropping one have K positions, not S; the first is the
    first token (what classifier heads pool)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = encoder_layers(model)
        self.shares: list[float] | None = None
        self._previous_impl = getattr(model.config, "_attn_implementation", None)
        if self._previous_impl != "eager":
            model.set_attn_implementation("eager")
        self._probs: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles = []
        for index, layer in enumerate(self.layers):
            attention = _self_attention(layer)
            self._handles.append(attention.register_forward_hook(self._keep_probs))
            self._handles.append(
                layer.register_forward_pre_hook(self._before_layer(index), with_kwargs=True)
            )
            self._handles.append(layer.register_forward_hook(self._after_layer(index)))

    def __enter__(self) -> TokenDropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._previous_impl not in (None, "eager"):
            self.model.set_attn_implementation(self._previous_impl)

    def check(self, shares: Sequence[float] | None) -> list[float] | None:
        if shares is None:
            return None
        shares = [float(s) for s in shares]
        if len(shares) != len(self.layers) - 1:
            raise ValueError(
                f"a length configuration has one share per layer but the last: "
                f"{len(self.layers) - 1} for this model, got {len(shares)}"
            )
        if not all(0.0 < s <= 1.0 for s in shares):
            raise ValueError(f"shares must be in (0, 1], got {shares}")
        return shares

    def _keep_probs(self, _module: Any, _args: Any, output: Any) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if self.shares is not None and (probs is None or probs.dim() != 4):
            raise RuntimeError("LengthDrop needs the attention probabilities: eager attention")
        self._probs = probs

    def _before_layer(self, index: int):
        def hook(_layer: Any, args: tuple, kwargs: dict):
            if index == 0:
                hidden = args[0]
                mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                self._valid = _valid_tokens(mask, hidden.shape[0], hidden.shape[1], hidden.device)
                self._mask = None
                return None
            if self._mask is None:  # no layer before dropped tokens
                return None
            if len(args) > 1:
                return (args[0], self._mask, *args[2:]), kwargs
            return args, {**kwargs, "attention_mask": self._mask}

        return hook

    def _after_layer(self, index: int):
        def hook(_layer: Any, _args: Any, output: Any):
            torch = require_torch()
            if self.shares is None or index >= len(self.shares) or self.shares[index] >= 1.0:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            scores = key_scores(self._probs, self._valid)
            rows, kept = select(scores, self._valid, self.shares[index])
            gathered = torch.gather(hidden, 1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
            self._valid = kept
            # Additive mask [B, 1, 1, K] as eager attention adds it to Q K^T.
            blocked = torch.finfo(hidden.dtype).min
            self._mask = torch.where(kept, 0.0, blocked).to(hidden.dtype)[:, None, None, :]
            if isinstance(output, tuple):
                return (gathered, *output[1:])
            return gathered

        return hook

    def __call__(self, shares: Sequence[float] | None, **inputs: Any) -> Any:
        """Run the model at the length configuration ``shares``."""
        self.shares = self.check(shares)
        try:
            return self.model(**inputs)
        finally:
            self.shares = None


def _valid_tokens(mask: Any, batch: int, length: int, device: Any) -> torch.Tensor:
    """[B, S] bool from the mask the first layer gets: None (all valid), or a 4-D additive or
    boolean mask whose last query row ([B, 1, ?, S]) tells which keys are valid."""
    torch = require_torch()
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    keys = mask[:, 0, -1, :] if mask.dim() == 4 else mask
    if keys.dtype == torch.bool:
        return keys.expand(batch, length).clone()
    return (keys == 0).expand(batch, length).clone()


def sandwich_loss(
    dropper: TokenDropper,
    full_logits: torch.Tensor,
    inputs: dict[str, Any],
    settings: LengthDrop,
    step: int,
) -> float:
    """Backpropagate the sub-models' in-place distillation loss (KL to the full model's
    ``full_logits``, detached) one sub-model at a time, so only one graph is alive; return
    the mean of their KL terms, for logs."""
    torch = require_torch()
    functional = torch.nn.functional
    t = settings.temperature
    target = functional.softmax(full_logits.detach() / t, dim=-1)
    configs = settings.configurations(len(dropper.layers), step)
    total = 0.0
    for shares in configs:
        logits = dropper(shares, **inputs).logits
        log_probs = functional.log_softmax(logits / t, dim=-1)
        kd = functional.kl_div(log_probs, target, reduction="batchmean") * t * t
        loss = settings.alpha * kd / len(configs)
        loss.backward()
        total += float(kd.detach())
    return total / max(1, len(configs))
