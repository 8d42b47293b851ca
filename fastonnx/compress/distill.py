"""Knowledge distillation from a dense teacher, and a small training loop that prunes as it goes.

Loss (B batch, L labels, T temperature)::

    alpha_task   * CE(student logits [B, L], labels [B])
  + alpha_kd     * T^2 * KL(softmax(teacher / T) || softmax(student / T))
  + alpha_hidden * mean over layers of MSE(student hidden [B, S, D], teacher hidden [B, S, D])
  + alpha_cosine * mean(1 - cos(student vector [B, D], teacher vector [B, D]))  (embeddings)

T^2 keeps the soft-target gradients on the scale of the hard-label ones as T changes (Hinton
et al., 2015). The hidden-state term needs both models to return the same number of hidden
states of the same shapes (the usual case here: the student is a pruned copy of the teacher).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastonnx.compress._deps import require_torch

if TYPE_CHECKING:
    import torch

    from fastonnx.compress.length_drop import LengthDrop
    from fastonnx.compress.pruning import BlockPruner


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 2.0
    alpha_task: float = 0.5
    alpha_kd: float = 0.5
    alpha_hidden: float = 0.0
    # Embedding models: 1 - cosine of the student's and teacher's output vectors (``logits``
    # holds the pooled sentence vector [B, D] there).
    alpha_cosine: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        weights = (self.alpha_task, self.alpha_kd, self.alpha_hidden, self.alpha_cosine)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not all 0, got alpha_task={self.alpha_task} "
                f"alpha_kd={self.alpha_kd} alpha_hidden={self.alpha_hidden} "
                f"alpha_cosine={self.alpha_cosine}"
            )

    @property
    def needs_teacher(self) -> bool:
        return self.alpha_kd > 0 or self.alpha_hidden > 0 or self.alpha_cosine > 0


@dataclass
class LossParts:
    """The weighted total (differentiable) and each unweighted term as a float, for logs."""

    total: torch.Tensor
    task: float = 0.0
    kd: float = 0.0
    hidden: float = 0.0
    cosine: float = 0.0
    length: float = 0.0  # LengthDrop: the sub-models' mean KL to the full-length model


def _hidden_mse(student_out: Any, teacher_out: Any) -> torch.Tensor:
    torch = require_torch()
    s_hidden = getattr(student_out, "hidden_states", None)
    t_hidden = getattr(teacher_out, "hidden_states", None)
    if s_hidden is None or t_hidden is None:
        raise ValueError(
            "alpha_hidden > 0 needs hidden states from both models: call them with "
            "output_hidden_states=True"
        )
    s_shapes = [tuple(h.shape) for h in s_hidden]
    t_shapes = [tuple(h.shape) for h in t_hidden]
    if s_shapes != t_shapes:
        raise ValueError(
            f"hidden-state distillation needs matching shapes; student {s_shapes} vs "
            f"teacher {t_shapes} (set alpha_hidden=0 for a differently shaped student)"
        )
    losses = [
        torch.nn.functional.mse_loss(s, t.detach()) for s, t in zip(s_hidden, t_hidden, strict=True)
    ]
    return torch.stack(losses).mean()


def distillation_loss(
    student_out: Any,
    teacher_out: Any | None,
    labels: torch.Tensor | None,
    config: DistillConfig = DistillConfig(),
) -> LossParts:
    """The combined loss from model outputs (objects with ``logits``, and ``hidden_states``
    when ``alpha_hidden`` > 0). ``teacher_out`` may be None only when ``alpha_kd`` and
    ``alpha_hidden`` are 0; ``labels`` may be None only when ``alpha_task`` is 0. Rows whose
    label is negative (-100) are unlabeled: no task loss, only the teacher's terms."""
    torch = require_torch()
    functional = torch.nn.functional
    logits = student_out.logits
    total = logits.new_zeros(())
    parts = LossParts(total)
    if config.alpha_task > 0:
        if labels is None:
            raise ValueError("alpha_task > 0 needs labels")
        # Labels < 0 (-100 by convention) mark unlabeled rows: they learn from the teacher only.
        labeled = labels >= 0
        if bool(labeled.any()):
            task = functional.cross_entropy(logits[labeled], labels[labeled])
            total = total + config.alpha_task * task
            parts.task = float(task.detach())
    if config.needs_teacher and teacher_out is None:
        raise ValueError("alpha_kd or alpha_hidden > 0 needs the teacher's outputs")
    if config.alpha_kd > 0:
        t = config.temperature
        teacher_probs = functional.softmax(teacher_out.logits.detach() / t, dim=-1)
        student_log_probs = functional.log_softmax(logits / t, dim=-1)
        kd = functional.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * t * t
        total = total + config.alpha_kd * kd
        parts.kd = float(kd.detach())
    if config.alpha_cosine > 0:
        cos = functional.cosine_similarity(logits, teacher_out.logits.detach(), dim=-1)
        cosine = (1.0 - cos).mean()
        total = total + config.alpha_cosine * cosine
        parts.cosine = float(cosine.detach())
    if config.alpha_hidden > 0:
        hidden = _hidden_mse(student_out, teacher_out)
        total = total + config.alpha_hidden * hidden
        parts.hidden = float(hidden.detach())
    parts.total = total
    return parts


# --------------------------------------------------------------------------------------------
# Training loop


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # total loss per step
    sparsity: float = 0.0  # the pruner's measured overall block sparsity at the end

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


def _forever(batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Cycle over ``batches`` (a list or a DataLoader: anything iterable more than once)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "batches ran out: pass a re-iterable (list, DataLoader), not a one-shot iterator"
            )


def train(
    student: Any,
    teacher: Any | None,
    batches: Iterable[Mapping[str, Any]],
    *,
    steps: int,
    optimizer: Any,
    pruner: BlockPruner | None = None,
    config: DistillConfig | None = None,
    lr_scheduler: Any | None = None,
    max_grad_norm: float | None = 1.0,
    log_every: int = 10,
    log: Callable[[str], None] | None = None,
    start_step: int = 0,
    on_step: Callable[[int, LossParts], None] | None = None,
    length_drop: LengthDrop | None = None,
) -> TrainResult:
    """Train ``student`` for ``steps`` optimizer steps; return the per-step losses.

    ``batches``: dicts of model inputs plus ``labels``, cycled as needed. ``teacher`` (any
    model returning ``logits``) is run without gradients in eval mode; None means plain
    fine-tuning (``config`` defaults to the task loss alone). ``pruner``: followed each step
    (:meth:`BlockPruner.update`) and attached to ``optimizer`` for the run, so pruned blocks
    stay zero. Progress goes to ``log`` (default: stderr) every ``log_every`` steps.

    Resuming: ``start_step`` skips the steps already done (their batches included, so a
    resumed run sees what an uninterrupted one would), given the model, optimizer, scheduler,
    pruner and RNG states saved after that step. ``on_step(done, parts)`` runs after each
    optimizer step (checkpoints, progress bars).

    ``length_drop``: LengthDrop training (:mod:`fastonnx.compress.length_drop`): each step
    also trains sub-models that drop tokens, on the full-length model's logits. For
    classifiers (models returning ``logits`` from the first token).
    """
    torch = require_torch()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
    if config is None:
        # Without a teacher: plain fine-tuning on the labels.
        plain = DistillConfig(alpha_task=1.0, alpha_kd=0.0)
        config = DistillConfig() if teacher is not None else plain
    if config.needs_teacher and teacher is None:
        raise ValueError("this DistillConfig weights the teacher's outputs but teacher is None")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    hidden = config.alpha_hidden > 0
    if teacher is not None:
        teacher.eval()
    student.train()
    dropper = None
    if length_drop is not None:
        from fastonnx.compress.length_drop import TokenDropper, sandwich_loss

        dropper = TokenDropper(student)
    if pruner is not None:
        pruner.attach(optimizer)
    result = TrainResult(steps=steps, seconds=0.0)
    start = time.perf_counter()
    stream = itertools.islice(_forever(batches), start_step, None)
    try:
        for step, batch in zip(range(start_step, steps), stream, strict=False):
            if pruner is not None:
                pruner.update(step)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = student(**inputs, output_hidden_states=hidden)
            teacher_out = None
            if teacher is not None and config.needs_teacher:
                with torch.no_grad():
                    teacher_out = teacher(**inputs, output_hidden_states=hidden)
            parts = distillation_loss(out, teacher_out, batch.get("labels"), config)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            if dropper is not None:
                parts.length = sandwich_loss(dropper, out.logits, inputs, length_drop, step)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
            optimizer.step()  # the pruner's post-step hook re-applies the masks
            if lr_scheduler is not None:
                lr_scheduler.step()
            result.losses.append(float(parts.total.detach()))
            if (step + 1) % log_every == 0 or step + 1 == steps:
                elapsed = time.perf_counter() - start
                log(_progress(step + 1, steps, parts, config, pruner, elapsed, start_step))
            if on_step is not None:
                on_step(step + 1, parts)
    finally:
        if pruner is not None:
            pruner.detach()
        if dropper is not None:
            dropper.close()
        student.eval()
    result.seconds = time.perf_counter() - start
    if pruner is not None:
        result.sparsity = pruner.overall_sparsity()
    return result


def _progress(
    done: int,
    steps: int,
    parts: LossParts,
    config: DistillConfig,
    pruner: BlockPruner | None,
    elapsed: float,
    start_step: int = 0,
) -> str:
    per_step = elapsed / max(1, done - start_step)
    line = f"step {done}/{steps}  loss {float(parts.total.detach()):.4f}"
    weighted = (
        ("task", config.alpha_task, parts.task),
        ("kd", config.alpha_kd, parts.kd),
        ("hidden", config.alpha_hidden, parts.hidden),
        ("cosine", config.alpha_cosine, parts.cosine),
    )
    terms = [f"{name} {value:.4f}" for name, alpha, value in weighted if alpha > 0]
    if parts.length:
        terms.append(f"length {parts.length:.4f}")
    if len(terms) > 1:
        line += " (" + ", ".join(terms) + ")"
    if pruner is not None:
        line += f"  sparsity {pruner.sparsity:.1%}"
    return line + f"  {per_step:.2f} s/step, eta {per_step * (steps - done):.0f} s"
