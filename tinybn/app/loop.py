"""The training loop, in the shape of the chapter's ``train_ch6``: epochs, batches, forward, loss, backward, step.

Read it next to d2l's loop: the same lines in the same order, and an accumulator of the summed loss, the correct
predictions and the examples seen. Everything else a training run does happens in callbacks around it, each in a
module of its own, and the loop never asks which ones there are:

* the learning-rate schedule, the speed and the progress bar (:mod:`tinybn.app.progress`);
* the divergence guard (:mod:`tinybn.app.guard`);
* evaluation, precise statistics and the keep-best rule (:mod:`tinybn.app.evaluation`);
* checkpoints and exact resume (:mod:`tinybn.app.checkpoint`), metrics files and plots (:mod:`tinybn.app.metrics`);
* BN-statistics recording (:mod:`tinybn.app.bnstats`).

Data parallelism (:mod:`tinybn.app.parallel`) wraps what the loop is given, not the loop: a loader of this rank's
shards, an optimizer that sums the gradients over the ranks before it steps, a loss for a shard that may be empty,
and ``reduce``, which sums the accumulator over the ranks at the end of an epoch.
"""
from __future__ import annotations

import numpy

from .. import functional as F


class Callback:
    """Hooks around :func:`fit`; each does nothing unless a subclass says otherwise. ``row`` holds the epoch's
    numbers (``epoch``, ``train_loss``, ``train_acc``); an ``on_epoch_end`` may add to it, for those after it."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_step_start(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, loss) -> None:
        pass

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        pass


class Accumulator:
    """Sums of ``n`` numbers over the steps of an epoch (d2l's ``Accumulator``). The sums stay where the values are
    (on the GPU, no copy per step) until :meth:`totals`."""

    def __init__(self, n: int):
        self.sums = [0.0] * n

    def add(self, *values) -> None:
        self.sums = [total + value for total, value in zip(self.sums, values)]

    def totals(self) -> numpy.ndarray:
        return numpy.array([float(total) for total in self.sums])


def _each(callbacks, hook: str, *args) -> None:
    for callback in callbacks:
        getattr(callback, hook)(*args)


def fit(model, optimizer, batches, epochs: int, *, loss_fn=F.cross_entropy, callbacks=(), first_epoch: int = 1,
        history=None, reduce=lambda totals: totals) -> list[dict]:
    """Train ``model`` for epochs ``first_epoch`` to ``epochs`` on ``batches`` (an iterable of (images, labels)
    tensors, new each epoch); returns ``history`` (a new list by default) with one row of numbers per epoch added.
    The row is in the history before the callbacks see it; ``reduce`` turns this process's sums into those of the
    whole job (the identity in one process)."""
    history = [] if history is None else history
    for epoch in range(first_epoch, epochs + 1):
        _each(callbacks, "on_epoch_start", epoch)
        model.train()
        metric = Accumulator(3)                 # summed training loss, correct predictions, examples
        for step, (X, y) in enumerate(batches, start=1):
            _each(callbacks, "on_step_start", step)
            y_hat = model(X)
            loss = loss_fn(y_hat, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            metric.add(loss.data.astype(numpy.float64) * len(y), (y_hat.data.argmax(axis=1) == y.data).sum(), len(y))
            _each(callbacks, "on_step_end", step, loss)
        loss_sum, correct, count = (float(total) for total in reduce(metric.totals()))
        if count == 0:
            raise ValueError(f"fit: epoch {epoch} had no batch; give batches that can be iterated anew every epoch "
                             f"(a DataLoader or a list), not a generator, which is used up after one")
        row = {"epoch": epoch, "train_loss": round(loss_sum / count, 6), "train_acc": round(correct / count, 6)}
        history.append(row)
        _each(callbacks, "on_epoch_end", epoch, row)
    return history
