"""Precise statistics after every epoch: the accuracy with every normalization layer's running statistics
recomputed over training batches (:func:`tinybn.nn.recompute_batch_norm_statistics`), next to the moving averages'.

The moving averages are put back after the evaluation: training goes on with them. The precise statistics of the
epoch are kept (``PreciseStatistics.statistics``) for the checkpoint, and the model a run returns predicts with
the last ones."""
from __future__ import annotations

from .. import backend
from ..nn import recompute_batch_norm_statistics, running_statistics
from .loop import Callback


def bn_statistics(model) -> dict:
    """Copies of every normalization layer's running statistics, by state-dict name."""
    return {name: tensor.data.copy() for name, tensor in running_statistics(model).items()}


def set_bn_statistics(model, statistics: dict) -> None:
    """Put running statistics (as :func:`bn_statistics` returns them) into ``model``; checks them all first."""
    buffers = running_statistics(model)
    for name, value in statistics.items():
        if name not in buffers:
            raise ValueError(f"precise BN statistics: {name} is not a running statistic of a normalization layer "
                             f"of this model")
        if tuple(value.shape) != buffers[name].shape:
            raise ValueError(f"precise BN statistics: {name} has shape {tuple(value.shape)}, "
                             f"the model's {buffers[name].shape}")
    for name, value in statistics.items():
        buffers[name].data = backend.to_device(value, backend.device_of(buffers[name].data)).astype(buffers[name].dtype)


def with_precise_bn(model, batches, evaluations: dict, comm=None) -> tuple[dict, dict]:
    """Recompute the BN statistics over ``batches`` (with ``comm``, over every rank's batches together), run each
    of ``evaluations`` (name -> function of the model) with them, and put the moving averages back; returns
    (results, the precise statistics)."""
    moving = bn_statistics(model)
    try:
        recompute_batch_norm_statistics(model, batches, comm=comm)
        results = {name: run(model) for name, run in evaluations.items()}
        precise = bn_statistics(model)
    finally:
        set_bn_statistics(model, moving)
    return results, precise


class PreciseStatistics(Callback):
    """``row[name + "_precise"]`` for each evaluation, with statistics recomputed over ``batches``."""

    def __init__(self, model, batches, evaluations: dict, comm=None):
        self.model, self.batches, self.evaluations, self.comm = model, batches, evaluations, comm
        self.statistics = None

    def on_epoch_end(self, epoch, row):
        results, statistics = with_precise_bn(self.model, self.batches, self.evaluations, self.comm)
        row.update({f"{name}_precise": round(value, 6) for name, value in results.items()})
        self.statistics = {name: backend.to_numpy(value) for name, value in statistics.items()}
