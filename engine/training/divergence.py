"""The divergence guard: a step whose loss or gradient norm is far above its running level.

A run that blows up usually shows it before any NaN: one update with a huge effective step (a learning-rate
spike, a bad batch) sends the loss and the gradient norm orders of magnitude above where they were, and the
non-finite values follow a few steps later. By then the last *finite* state is already ruined, so a guard that
only watches for NaNs keeps a useless "last good" checkpoint.

``DivergenceGuard`` keeps the last ``train.divergence_window`` healthy values of the loss and of the gradient
norm. Once it holds that many, a finite step whose loss or gradient norm exceeds ``train.divergence_factor``
times their median (when that median is > 0) is *diverging*: its update is applied (a transient spike may
recover), it is logged (``diverging=1``) and it is not added to the window, so the level stays the healthy
one. The trainer counts it as a bad step like a non-finite one; what it does with the count (suspect
checkpoints, pruning, the stop and the roll-back of ``latest``) is described in vidpo.training.trainer.
"""
from __future__ import annotations

import statistics
from typing import Optional


class DivergenceGuard:
    """Running level of the loss and gradient norm; ``factor`` 0 turns the check off."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.window = window
        self.history: dict[str, list[float]] = {"loss": [], "gradient norm": []}

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why this finite step is diverging, or None when it is healthy (it then joins the window)."""
        values = {"loss": loss, "gradient norm": grad_norm}
        reasons = []
        for name, value in values.items():
            history = self.history[name]
            if self.factor > 0 and len(history) >= self.window:
                level = statistics.median(history[-self.window:])
                if level > 0 and value > self.factor * level:
                    reasons.append(f"{name} {value:.4g} > {self.factor:g} x its running median {level:.4g}")
        if reasons:
            return "; ".join(reasons)
        for name, value in values.items():
            self.history[name] = (self.history[name] + [value])[-self.window:]
        return None

    def state_dict(self) -> dict:
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        for name in self.history:
            self.history[name] = [float(v) for v in state.get(name, [])]
