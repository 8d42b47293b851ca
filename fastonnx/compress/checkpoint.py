"""Training checkpoints that a resumed run continues from bit for bit.

One file, ``state.pt``, written to a temporary name and renamed into place, so a crash while
saving leaves the previous checkpoint. It holds everything a step depends on: the student's
weights, the optimizer's and LR scheduler's states, the pruner's masks, the RNG state (dropout)
and the number of steps done, plus a fingerprint of the run's settings, so a checkpoint is never
continued with other settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastonnx.compress._deps import require_torch

STATE = "state.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (other settings, another format, unreadable)."""


def save(
    folder: Path,
    *,
    step: int,
    fingerprint: str,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    pruner: Any,
) -> Path:
    torch = require_torch()
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "step": step,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "pruner": pruner.state_dict(),
        "rng": torch.get_rng_state(),
    }
    final = folder / STATE
    tmp = folder / f".{STATE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, final)
    return final


def exists(folder: Path) -> bool:
    return (folder / STATE).is_file()


def load(
    folder: Path, *, fingerprint: str, model: Any, optimizer: Any, scheduler: Any, pruner: Any
) -> int:
    """Restore a checkpoint into the given objects; return the steps it had done."""
    torch = require_torch()
    path = folder / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastonnx compress checkpoint (format {FORMAT})")
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path} was made with other settings (model, data or training options); resume "
            "with the same options, or pass --force to start over"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    pruner.load_state_dict(state["pruner"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
