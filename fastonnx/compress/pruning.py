"""Hardware-aware block pruning of an encoder's linear layers.

Glossary: W is a layer weight in PyTorch's [N, K] layout (N output channels, K input features).
A block is (R rows, C cols) of W, so (1, 4) is four consecutive input features of one output
channel: one VNNI int8 group, the unit fastonnx's sparse kernels skip. Pruning a block zeroes
it; the ONNX sparse lowering then packs only the blocks left.

"Hardware-aware" means the block shape is one the kernels accept (``supported_block_shapes``),
by default the one the deployment CPU prefers. A model is usually pruned on one machine and
served on another, so the pruner takes a ``target``: ``"auto"`` (this CPU) or a CPU class
(``TARGETS``: ``"avx512_vnni"``, ``"amx"``, ``"avx2"``), whose preferred shape
(:func:`preferred_block_shape`) it uses unless an explicit ``block_shape`` is given.

Blocks are ranked by magnitude (L2 or L1 norm of the block) or by the Fisher criterion (the
block's sum of w^2 * E[g^2] over the training gradients since the last mask update: the
diagonal-Fisher estimate of the loss increase from zeroing it, as in Optimal Brain Damage;
on MiniLM at 80% 1x4 it kept 5 points more dev accuracy than magnitude), per layer (every
layer reaches the same sparsity) or globally (one threshold over all selected layers, so
layers that matter less lose more). Masks are exact: ``round(s * blocks)`` blocks are pruned,
ties broken by position.
Once attached to an optimizer the pruner masks gradients and re-applies the masks after each
step, so pruned blocks stay exactly zero through training (Adam's moments would otherwise move
them).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fastonnx.compress._deps import require_torch
from fastonnx.compress.schedule import CubicSchedule, check_sparsity

if TYPE_CHECKING:
    import torch

BlockShape = tuple[int, int]

# The shapes every kernel build accepts; used only when the native module is missing.
_PORTABLE_SHAPES: tuple[BlockShape, ...] = ((1, 4),)

# Task heads stay dense by default: they are small, and pruning them costs accuracy for no
# speed (the sparse lowering targets the encoder's GEMMs). Embeddings and LayerNorm are not
# nn.Linear, so they are never selected.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(classifier|pre_classifier|pooler|qa_outputs|lm_head|score)(\.|$)",
)

NORMS = ("l2", "l1")
# How blocks are ranked: "magnitude" (the block's norm) or "fisher" (the block's sum of
# w^2 * E[g^2], the diagonal-Fisher estimate of the loss increase from zeroing it, as in
# Optimal Brain Damage; gradients collected over the steps since the last mask update).
CRITERIA = ("magnitude", "fisher")
SCOPES = ("layer", "global")

# Deployment CPU classes a model can be pruned for ("auto": the CPU this runs on). The names are
# the native kernel paths' (fastonnx._native.all_isas(), less the portable "ref").
TARGETS: tuple[str, ...] = ("auto", "avx512_vnni", "amx", "avx2")


# --------------------------------------------------------------------------------------------
# Block shapes


def _native_module():
    try:
        from fastonnx import _native
    except ImportError:
        return None
    return _native


def supported_block_shapes() -> list[BlockShape]:
    """Block shapes the native kernels accept, as (rows, cols) of W [N, K]."""
    native = _native_module()
    if native is None:
        return list(_PORTABLE_SHAPES)
    return [tuple(s) for s in native.supported_block_shapes()]


def check_target(target: str | None) -> str:
    """``target`` as one of :data:`TARGETS` (None is ``"auto"``); a ValueError otherwise."""
    if target is None:
        return "auto"
    name = str(target).lower()
    if name not in TARGETS:
        raise ValueError(f"unknown target CPU {target!r}; choose from {', '.join(TARGETS)}")
    return name


def preferred_block_shape(target: str | None = None) -> BlockShape:
    """The block shape the kernels of ``target`` (see :data:`TARGETS`; None or ``"auto"``:
    this CPU) exploit best."""
    target = check_target(target)
    native = _native_module()
    if native is None:
        warnings.warn(
            "fastonnx._native is not built; pruning with the portable 1x4 block shape",
            stacklevel=2,
        )
        return _PORTABLE_SHAPES[0]
    return tuple(native.preferred_block_shape(None if target == "auto" else target))


def target_isa(target: str | None = None) -> str:
    """The kernel path ``target`` names; for ``"auto"``, the one this CPU runs."""
    target = check_target(target)
    if target != "auto":
        return target
    native = _native_module()
    return "unknown (fastonnx._native not built)" if native is None else native.best_isa()


def resolve_block_shape(
    block_shape: Sequence[int] | str | None, target: str | None = None
) -> BlockShape:
    """A supported (rows, cols) from a pair or an ``"RxC"`` string; None (or ``"auto"``) is the
    shape ``target`` prefers (see :func:`preferred_block_shape`)."""
    if block_shape is None or (isinstance(block_shape, str) and block_shape.lower() == "auto"):
        return preferred_block_shape(target)
    check_target(target)
    if isinstance(block_shape, str):
        parts = block_shape.lower().split("x")
        try:
            block_shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"block shape {block_shape!r} is not of the form RxC") from None
    shape = tuple(int(v) for v in block_shape)
    supported = supported_block_shapes()
    if shape not in supported:
        accepted = ", ".join(f"{r}x{c}" for r, c in supported)
        raise ValueError(
            f"block shape {'x'.join(map(str, shape))} is not supported by fastonnx's kernels; "
            f"accepted (rows x cols of the [out, in] weight): {accepted}"
        )
    return shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Block arithmetic on one weight


def _block_view(weight: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """W [N, K] zero-padded to whole blocks, viewed as [N/R, R, K/C, C]."""
    torch = require_torch()
    (n, k), (r, c) = weight.shape, block
    pad_rows, pad_cols = -n % r, -k % c
    if pad_rows or pad_cols:
        weight = torch.nn.functional.pad(weight, (0, pad_cols, 0, pad_rows))
    return weight.reshape((n + pad_rows) // r, r, (k + pad_cols) // c, c)


def block_scores(weight: torch.Tensor, block: BlockShape, norm: str = "l2") -> torch.Tensor:
    """The magnitude of every block: a [N/R, K/C] grid (edge blocks partial)."""
    blocks = _block_view(weight.detach().float(), block)
    if norm == "l2":
        return blocks.pow(2).sum(dim=(1, 3)).sqrt()
    if norm == "l1":
        return blocks.abs().sum(dim=(1, 3))
    raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")


def nonzero_blocks(weight: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Bool [N/R, K/C] grid: True where a block holds any non-zero value."""
    return (_block_view(weight.detach(), block) != 0).any(dim=3).any(dim=1)


def expand_block_mask(
    block_mask: torch.Tensor, block: BlockShape, shape: Sequence[int]
) -> torch.Tensor:
    """An element mask of ``shape`` from a block grid (edge blocks cropped)."""
    r, c = block
    full = block_mask.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return full[: shape[0], : shape[1]].contiguous()


@dataclass(frozen=True)
class LayerSparsity:
    """Measured block sparsity of one weight."""

    name: str
    shape: tuple[int, int]  # [N, K]
    block_shape: BlockShape
    blocks: int
    zero_blocks: int

    @property
    def sparsity(self) -> float:
        return self.zero_blocks / self.blocks if self.blocks else 0.0


def measure(name: str, weight: Any, block: BlockShape) -> LayerSparsity:
    """Zero blocks of a torch tensor or NumPy array W [N, K]."""
    torch = require_torch()
    if isinstance(weight, torch.Tensor):
        w = weight
    else:  # arrays read from ONNX files are read-only, which torch.from_numpy warns about
        w = torch.from_numpy(np.array(weight, copy=not weight.flags.writeable))
    grid = nonzero_blocks(w, block)
    total = grid.numel()
    return LayerSparsity(name, tuple(w.shape), block, total, total - int(grid.sum()))


def format_report(layers: Iterable[LayerSparsity]) -> str:
    """A per-layer table plus the overall (block-weighted) sparsity."""
    layers = list(layers)
    width = max((len(x.name) for x in layers), default=5)
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'block':>5}  {'zero blocks':>17}  sparsity"]
    for x in layers:
        shape = f"{x.shape[0]}x{x.shape[1]}"
        block = f"{x.block_shape[0]}x{x.block_shape[1]}"
        counts = f"{x.zero_blocks}/{x.blocks}"
        lines.append(f"{x.name:<{width}}  {shape:>11}  {block:>5}  {counts:>17}  {x.sparsity:7.1%}")
    total = sum(x.blocks for x in layers)
    zero = sum(x.zero_blocks for x in layers)
    overall = zero / total if total else 0.0
    counts = f"{zero}/{total}"
    lines.append(f"{'overall':<{width}}  {'':>11}  {'':>5}  {counts:>17}  {overall:7.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Layer selection


def check_block_shape_divides(layers: dict[str, Any], block: BlockShape) -> None:
    """A ValueError naming the layers whose W [N, K] is not a whole number of blocks.

    The pruner itself handles ragged edges (partial edge blocks); this is for callers that want
    every block whole, so a block's share of the sparsity is exactly one block.
    """
    r, c = block
    bad = [
        f"{name} [{m.weight.shape[0]}, {m.weight.shape[1]}]"
        for name, m in layers.items()
        if m.weight.shape[0] % r or m.weight.shape[1] % c
    ]
    if bad:
        raise ValueError(
            f"block shape {r}x{c} does not divide {len(bad)} layer weight(s) [out, in]: "
            + ", ".join(bad[:4])
            + (", ..." if len(bad) > 4 else "")
            + "; choose a block shape whose rows divide every output size and whose columns "
            "divide every input size"
        )


def select_linear_layers(
    model: Any,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
) -> dict[str, Any]:
    """The model's ``nn.Linear`` modules to prune, by qualified name.

    ``include``/``exclude`` are regular expressions searched in the module name (e.g.
    ``r"\\.attention\\."``); a layer is selected when it matches some include pattern (all do
    when ``include`` is None) and no exclude pattern. Raises ValueError when nothing is left.
    """
    torch = require_torch()
    linear = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    if not linear:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers: nothing to block-prune "
            "(fastonnx prunes the linear layers of transformer encoders)"
        )
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in exclude or ()]
    selected = {
        name: module
        for name, module in linear.items()
        if (inc is None or any(p.search(name) for p in inc))
        and not any(p.search(name) for p in exc)
    }
    if not selected:
        names = ", ".join(list(linear)[:8]) + (", ..." if len(linear) > 8 else "")
        raise ValueError(
            f"no nn.Linear layer of {type(model).__name__} is left after include={include} "
            f"exclude={list(exclude or ())}; its linear layers: {names}"
        )
    return selected


# --------------------------------------------------------------------------------------------
# The pruner


class _Layer:
    """One pruned weight: its module, block mask, and the element mask the hooks read."""

    def __init__(self, name: str, module: Any, block: BlockShape) -> None:
        self.name = name
        self.module = module
        self.block = block
        self.block_mask = None  # bool [N/R, K/C]; None until the first prune
        self.pruned = None  # bool [N, K], True where the weight is forced to zero
        self.collect = False  # "fisher": sum squared gradients as they pass the hook
        self.grad_sq = None  # float [N, K]: the sum since the last prune
        self.grad_count = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def set_mask(self, block_mask: torch.Tensor) -> None:
        self.block_mask = block_mask
        self.pruned = ~expand_block_mask(block_mask, self.block, self.weight.shape).to(
            self.weight.device
        )

    def apply(self) -> None:
        if self.pruned is not None:
            self.weight.data.masked_fill_(self.pruned, 0.0)

    def mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.collect:
            g = grad.detach().float()
            if self.grad_sq is None:
                self.grad_sq = g.square()
            else:
                self.grad_sq.addcmul_(g, g)  # in place: no new [N, K] tensor per step
            self.grad_count += 1
        return grad if self.pruned is None else grad.masked_fill(self.pruned, 0.0)

    def fisher_scores(self, block: BlockShape) -> torch.Tensor | None:
        """Per-block sum of w^2 * mean(g^2) over the collected steps; None before any."""
        if self.grad_sq is None or not self.grad_count:
            return None
        saliency = self.weight.detach().float().square() * (self.grad_sq / self.grad_count)
        return _block_view(saliency, block).sum(dim=(1, 3))

    def reset_gradients(self) -> None:
        self.grad_sq, self.grad_count = None, 0


class BlockPruner:
    """Block-prunes ``model``'s selected linear layers to a sparsity or along a schedule.

    ``sparsity``: a float in [0, 1) (pruned at once by :meth:`prune` or the first
    :meth:`update`) or a :class:`CubicSchedule` (followed by :meth:`update` each step).
    ``block_shape``: one of :func:`supported_block_shapes` (default: the one ``target``
    prefers). ``target``: the deployment CPU, one of :data:`TARGETS` (default ``"auto"``, this
    CPU); :attr:`target` and :attr:`block_shape` say what was used.
    ``norm``: ``"l2"`` or ``"l1"`` block magnitude. ``scope``: ``"layer"`` or ``"global"``.
    ``criterion``: ``"magnitude"`` or ``"fisher"`` (w^2 * E[g^2] per block from the gradients
    seen while attached, since the last mask update; magnitude until there are any).
    ``include``/``exclude``: see :func:`select_linear_layers`.

    Typical training use::

        pruner = BlockPruner(model, CubicSchedule(0.9, begin_step=0, end_step=800, frequency=50))
        pruner.attach(optimizer)  # masks gradients, re-applies masks after optimizer.step()
        for step in range(steps):
            pruner.update(step)
            ...  # forward, backward, optimizer.step()
        print(pruner.report())
    """

    def __init__(
        self,
        model: Any,
        sparsity: float | CubicSchedule,
        *,
        block_shape: Sequence[int] | str | None = None,
        target: str | None = None,
        norm: str = "l2",
        scope: str = "layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
        criterion: str = "magnitude",
    ) -> None:
        if isinstance(sparsity, CubicSchedule):
            self.schedule = sparsity
        else:
            self.schedule = CubicSchedule.one_shot(check_sparsity(sparsity))
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
        self.criterion = criterion
        self.target = check_target(target)
        self.block_shape = resolve_block_shape(block_shape, self.target)
        self.norm = norm
        self.scope = scope
        self.model = model
        layers = select_linear_layers(model, include, exclude)
        self._layers = [_Layer(name, m, self.block_shape) for name, m in layers.items()]
        self.sparsity = 0.0  # the target the current masks were computed for
        self._hooks: list[Any] = []

    @property
    def target_sparsity(self) -> float:
        return self.schedule.final_sparsity

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def weights(self) -> dict[str, torch.Tensor]:
        """The pruned weights W [N, K] by layer name."""
        return {x.name: x.weight for x in self._layers}

    def masks(self) -> dict[str, torch.Tensor]:
        """Bool block masks (True = kept) by layer name; empty before the first prune."""
        return {x.name: x.block_mask for x in self._layers if x.block_mask is not None}

    # -- pruning ---------------------------------------------------------------------------

    def _scores(self, layer: _Layer) -> torch.Tensor:
        scores = None
        if self.criterion == "fisher":
            scores = layer.fisher_scores(self.block_shape)
        if scores is None:
            scores = block_scores(layer.weight, self.block_shape, self.norm)
        scores = scores.flatten()
        if layer.block_mask is not None:
            # Pruned blocks rank below everything, so masks only grow as the schedule rises
            # (their weights are 0 anyway; this keeps ties with other all-zero blocks stable).
            scores = scores.masked_fill(~layer.block_mask.flatten().to(scores.device), -1.0)
        return scores

    @staticmethod
    def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Bool mask of ``scores``' shape keeping all but the round(s * n) lowest."""
        torch = require_torch()
        num_pruned = round(sparsity * scores.numel())
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        if num_pruned:
            order = torch.argsort(scores.flatten(), stable=True)
            keep[order[:num_pruned]] = False
        return keep.reshape(scores.shape)

    def prune(self, sparsity: float) -> None:
        """Recompute the masks for ``sparsity`` from the current weights and apply them."""
        torch = require_torch()
        sparsity = check_sparsity(sparsity)
        with torch.no_grad():
            if self.scope == "layer":
                for layer in self._layers:
                    grid = nonzero_blocks(layer.weight, self.block_shape).shape
                    keep = self._keep_mask(self._scores(layer), sparsity)
                    layer.set_mask(keep.reshape(grid))
            else:
                scores = [self._scores(layer) for layer in self._layers]
                keep = self._keep_mask(torch.cat([s.cpu() for s in scores]), sparsity)
                for layer, part in zip(
                    self._layers, keep.split([s.numel() for s in scores]), strict=True
                ):
                    grid = nonzero_blocks(layer.weight, self.block_shape).shape
                    layer.set_mask(part.reshape(grid))
            self.apply_masks()
        for layer in self._layers:
            layer.reset_gradients()  # the next update ranks by the gradients seen after this one
        self.sparsity = sparsity

    def update(self, step: int) -> bool:
        """Follow the schedule at ``step``: re-prune when its value changed. Returns whether."""
        target = self.schedule(step)
        masked = self._layers[0].block_mask is not None
        if target == self.sparsity and (masked or target == 0.0):
            return False
        self.prune(target)
        return True

    def apply_masks(self) -> None:
        """Zero every pruned block (after an optimizer step, after loading weights...)."""
        torch = require_torch()
        with torch.no_grad():
            for layer in self._layers:
                layer.apply()

    def state_dict(self) -> dict[str, Any]:
        """The masks and the sparsity they were made for (a checkpoint of the pruning)."""
        state = {
            "sparsity": self.sparsity,
            "block_shape": list(self.block_shape),
            "masks": {x.name: x.block_mask.cpu() for x in self._layers if x.block_mask is not None},
        }
        # "fisher": the gradients gathered since the last update, so a resumed run ranks the
        # blocks exactly as an uninterrupted one would.
        gathered = [x for x in self._layers if x.grad_sq is not None]
        if gathered:
            state["grad_sq"] = {x.name: x.grad_sq.cpu().clone() for x in gathered}
            state["grad_count"] = {x.name: x.grad_count for x in gathered}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same model layers and block shape) and apply the masks."""
        if tuple(state["block_shape"]) != self.block_shape:
            raise ValueError(
                f"pruner state has block shape {state['block_shape']}, this pruner "
                f"{list(self.block_shape)}"
            )
        masks = state["masks"]
        unknown = set(masks) - set(self.layer_names)
        if unknown:
            raise ValueError(f"pruner state names layers this model lacks: {sorted(unknown)[:4]}")
        grad_sq, grad_count = state.get("grad_sq", {}), state.get("grad_count", {})
        for layer in self._layers:
            if layer.name in masks:
                layer.set_mask(masks[layer.name].to(layer.weight.device))
            layer.reset_gradients()
            if layer.name in grad_sq:
                layer.grad_sq = grad_sq[layer.name].to(layer.weight.device).clone()
                layer.grad_count = int(grad_count[layer.name])
        self.sparsity = float(state["sparsity"])
        self.apply_masks()

    # -- training hooks --------------------------------------------------------------------

    def attach(self, optimizer: Any | None = None) -> BlockPruner:
        """Mask the pruned weights' gradients, and re-apply the masks after each
        ``optimizer.step()`` (weight decay and momentum move zero-gradient weights)."""
        if self._hooks:
            raise RuntimeError("pruner is already attached; call detach() first")
        for layer in self._layers:
            layer.collect = self.criterion == "fisher"
            self._hooks.append(layer.weight.register_hook(layer.mask_grad))
        if optimizer is not None:
            self._hooks.append(
                optimizer.register_step_post_hook(lambda *_args, **_kw: self.apply_masks())
            )
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer in self._layers:
            layer.collect = False

    # -- reporting -------------------------------------------------------------------------

    def layer_sparsity(self) -> list[LayerSparsity]:
        """Block sparsity measured from the weights themselves (not the masks)."""
        return [measure(x.name, x.weight, self.block_shape) for x in self._layers]

    def overall_sparsity(self) -> float:
        layers = self.layer_sparsity()
        return sum(x.zero_blocks for x in layers) / sum(x.blocks for x in layers)

    def describe(self) -> str:
        """One line: layers, block shape and the target it was chosen for."""
        r, c = self.block_shape
        return (
            f"{len(self._layers)} layers, {r}x{c} blocks, target {self.target} "
            f"(kernel path {target_isa(self.target)}), {self.scope} scope, "
            f"{self.criterion} criterion"
        )

    def report(self) -> str:
        return format_report(self.layer_sparsity())


def prune_once(model: Any, sparsity: float, **kwargs: Any) -> BlockPruner:
    """One-shot magnitude block pruning (no training); returns the pruner for its report.

    ``kwargs`` are :class:`BlockPruner`'s (``block_shape``, ``norm``, ``scope``...).
    """
    pruner = BlockPruner(model, sparsity, **kwargs)
    pruner.prune(pruner.target_sparsity)
    return pruner
