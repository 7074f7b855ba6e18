"""The divergence guard: a run whose loss, or whose weights, turn NaN or infinite stops there, and says where.

The loss is checked every ``check_every`` steps (every step on the CPU, where copying it to the host costs
nothing; every 25 on the GPU, which must not wait for each step), the parameters and buffers after every epoch
(the last step's update comes after its loss was checked). With several ranks, the ranks agree on whether any
loss was bad (``agree``), so that all stop at the same step and none waits for the others in a collective.
"""
from __future__ import annotations

import math

from .. import backend
from .loop import Callback


class Diverged(RuntimeError):
    """The loss, or a parameter or buffer, became NaN or infinite."""

    def __init__(self, epoch: int, step: int, what: str, lr: float):
        self.epoch, self.step = epoch, step
        super().__init__(f"{what} at epoch {epoch}, step {step} (lr {lr:g}); "
                         f"try a smaller learning rate, e.g. --lr {lr / 2:g}")


def non_finite_entries(model) -> list[str]:
    """Names of the parameters and buffers that hold a NaN or an infinity."""
    bad = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        xp = backend.get_array_module(tensor.data)
        if tensor.dtype.kind == "f" and not bool(xp.isfinite(tensor.data).all()):
            bad.append(name)
    return bad


class DivergenceGuard(Callback):
    """Raises :class:`Diverged` at the first NaN or infinite loss, or parameter or buffer after an epoch."""

    def __init__(self, model, optimizer, steps_per_epoch: int, check_every: int = 1, agree=None):
        self.model, self.optimizer, self.steps, self.check_every = model, optimizer, steps_per_epoch, check_every
        self.agree = agree or (lambda bad: bad)       # with ranks: how many of them saw a bad loss
        self.pending, self.epoch = [], 0

    def on_epoch_start(self, epoch):
        self.epoch, self.pending = epoch, []

    def on_step_end(self, step, loss):
        self.pending.append((step, loss.data))
        if step % self.check_every == 0 or step == self.steps:
            values = [(s, float(v)) for s, v in self.pending]
            self.pending = []
            bad = [(s, v) for s, v in values if not math.isfinite(v)]
            if self.agree(len(bad)):
                step, value = bad[0] if bad else values[-1]
                what = f"the training loss became {value}" if bad else "the training loss of another rank diverged"
                raise Diverged(self.epoch, step, what, self.optimizer.lr)

    def on_epoch_end(self, epoch, row):
        bad = non_finite_entries(self.model)
        if bad:
            raise Diverged(epoch, self.steps, f"{len(bad)} of the model's parameters and buffers became NaN or "
                           f"infinite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})", self.optimizer.lr)
