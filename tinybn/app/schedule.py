"""The learning rate of every step (:func:`tinybn.optim.learning_rate`), set on the optimizer before the step."""
from __future__ import annotations

from ..optim import learning_rate
from .loop import Callback


class LearningRateSchedule(Callback):
    """``schedule`` ("constant" or "cosine", over all the run's steps) from ``base_lr``; the rate of the epoch's last
    step goes into the epoch's row."""

    def __init__(self, optimizer, schedule: str, base_lr: float, steps_per_epoch: int, epochs: int):
        self.optimizer, self.schedule, self.base_lr = optimizer, schedule, base_lr
        self.steps_per_epoch, self.total = steps_per_epoch, epochs * steps_per_epoch
        self.first_step = 0

    def on_epoch_start(self, epoch):
        self.first_step = (epoch - 1) * self.steps_per_epoch

    def on_step_start(self, step):
        self.optimizer.lr = learning_rate(self.schedule, self.base_lr, self.first_step + step - 1, self.total)

    def on_epoch_end(self, epoch, row):
        row["lr"] = round(self.optimizer.lr, 6)
