"""SGD with optional momentum and weight decay, and learning-rate schedules."""
from __future__ import annotations

import math

import numpy

from . import backend


class SGD:
    """``v ← μ·v + (g + λ·w)``, ``w ← w − lr·v`` (plain SGD when μ = 0), updated in place.

    Parameters with ``requires_grad = False`` (frozen) or without a gradient are skipped.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a positive finite number, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight decay must be a finite number of at least 0, got {weight_decay}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.velocity = [None] * len(self.params)

    def zero_grad(self):
        for param in self.params:
            param.grad = None

    def step(self):
        for i, param in enumerate(self.params):
            if not param.requires_grad or param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay:
                grad = grad + self.weight_decay * param.data
            if self.momentum:
                if self.velocity[i] is None:
                    self.velocity[i] = grad.copy()
                else:
                    self.velocity[i] *= self.momentum
                    self.velocity[i] += grad
                grad = self.velocity[i]
            param.data -= self.lr * grad

    def state_dict(self) -> dict:
        return {f"velocity.{i}": backend.to_numpy(v) for i, v in enumerate(self.velocity) if v is not None}

    def load_state_dict(self, state: dict) -> None:
        """Load velocities saved by :meth:`state_dict`; every entry is checked before any is taken."""
        velocity = [None] * len(self.params)
        for key, value in state.items():
            kind, _, index = key.partition(".")
            if kind != "velocity" or not index.isdigit() or int(index) >= len(self.params):
                raise ValueError(f"optimizer state: unexpected entry {key!r} (this optimizer has {len(self.params)} "
                                 f"parameters, velocity.0 to velocity.{len(self.params) - 1})")
            param = self.params[int(index)]
            if tuple(value.shape) != param.shape:
                raise ValueError(f"optimizer state: {key} has shape {tuple(value.shape)}, its parameter {param.shape}")
            velocity[int(index)] = backend.to_device(numpy.asarray(value).astype(param.dtype), param.device)
        self.velocity = velocity


def learning_rate(schedule: str, base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps``: ``"constant"`` or ``"cosine"`` (to 0)."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}; use 'constant' or 'cosine'")
