"""The keep-best rule: the epoch with the best validation accuracy (or, for demonstration only, test accuracy),
with precise statistics where the run computes them, is also kept as ``best.npz``."""
from __future__ import annotations

from .loop import Callback


class KeepBest(Callback):
    """Notes whether the epoch just ended (the last row of ``history``) is the best so far by ``key``; the checkpoint
    callback after it saves ``best.npz`` then."""

    def __init__(self, key: str, history: list[dict]):
        self.key, self.history, self.best = key, history, False

    def on_epoch_end(self, epoch, row):
        self.best = row[self.key] >= max(r.get(self.key, -1.0) for r in self.history)
