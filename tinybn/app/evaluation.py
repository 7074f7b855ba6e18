"""Accuracy in prediction mode, after every epoch, on the held-out images (test, and validation when asked)."""
from __future__ import annotations

import numpy

from ..autograd import no_grad
from .loop import Callback


def evaluate(model, loader, comm=None) -> float:
    """Accuracy in prediction mode (moving averages, no dropout); the model's mode is restored.

    With ``comm``, each rank's loader holds its share of the images and the accuracy is over all of them
    (one all_reduce of the hit and image counts; every rank must call this)."""
    was_training = model.training
    model.eval()
    correct = None
    count = 0
    with no_grad():
        for images, labels in loader:
            hits = (model(images).data.argmax(axis=1) == labels.data).sum()
            correct = hits if correct is None else correct + hits
            count += len(labels)
    model.train(was_training)
    if comm is not None:
        correct, count = comm.all_reduce(numpy.array([0 if correct is None else float(correct), count], numpy.float64))
    return float(correct) / max(1.0, float(count))


class Evaluation(Callback):
    """``row[name]`` = the accuracy of each ``evaluations`` entry (name -> function of the model)."""

    def __init__(self, model, evaluations: dict):
        self.model, self.evaluations = model, evaluations

    def on_epoch_end(self, epoch, row):
        row.update({name: round(run(self.model), 6) for name, run in self.evaluations.items()})
