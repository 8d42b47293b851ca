"""Gradual pruning schedules (pure Python: usable and testable without torch).

The cubic schedule of Zhu & Gupta, "To prune, or not to prune" (2017): sparsity rises fast
while many redundant weights remain and flattens as it nears the target, giving the network
time to recover between updates::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3      for t0 <= t <= t0 + n * dt

with s_i the initial and s_f the final sparsity, t0 the begin step, n * dt = end - begin, and
masks recomputed every dt (``frequency``) steps.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """``value`` as a float in [0, 1); a ValueError otherwise (1.0 would remove every block)."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


@dataclass(frozen=True)
class CubicSchedule:
    """Target sparsity per optimizer step.

    Before ``begin_step`` nothing is pruned (0.0); from it the value follows the cubic, held
    constant between updates (every ``frequency`` steps, counted from ``begin_step``), and it is
    ``final_sparsity`` from ``end_step`` on.
    """

    final_sparsity: float
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 1
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity {self.initial_sparsity} is above "
                f"final_sparsity {self.final_sparsity}"
            )
        if self.begin_step < 0 or self.end_step < self.begin_step:
            raise ValueError(
                f"need 0 <= begin_step <= end_step, got {self.begin_step=} {self.end_step=}"
            )
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")

    def __call__(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        # Hold the value between updates: t is the last update step at or before `step`.
        t = step - (step - self.begin_step) % self.frequency
        progress = (t - self.begin_step) / (self.end_step - self.begin_step)
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3

    @classmethod
    def one_shot(cls, sparsity: float) -> CubicSchedule:
        """Full sparsity from step 0 (magnitude pruning without a ramp)."""
        return cls(final_sparsity=sparsity, begin_step=0, end_step=0)
