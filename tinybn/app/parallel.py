"""Data parallelism around the training loop: what :func:`tinybn.app.loop.fit` is given changes, not the loop.

P ranks of an MPI job (:mod:`tinybn.distributed`) each hold the whole model and train on their shard of every
global batch of ``batch_size``:

* the model's normalization layers become their synchronized forms (:func:`tinybn.nn.convert_sync`), unless
  per-shard batch norm is asked for; every rank starts from rank 0's state;
* the loader yields this rank's shard of each global batch (:class:`Shards` remembers the sizes);
* the loss is the shard's mean, with the gradient of the shard's share of the global batch's mean loss (0, still
  connected to the model, for an empty shard: its backward must run, for synchronized layers' collectives);
* the optimizer (:class:`SummedOverRanks`) sums the gradients over the ranks, in one all_reduce, before it steps:
  the gradients of the global batch's mean loss;
* ``reduce`` sums the loop's accumulator over the ranks at the end of an epoch;
* with per-shard batch norm, rank 0's running statistics go to every rank after each epoch (as PyTorch's
  DistributedDataParallel broadcasts buffers), so that all evaluate and save one model.
"""
from __future__ import annotations

import numpy

from .. import backend
from .. import distributed as dist
from .. import functional as F
from ..autograd import Tensor, no_grad
from ..nn import convert_sync, is_materialized
from .loop import Callback


class Shards:
    """A sharded loader's batches, remembering the current one's shard and global sizes, and the loss of a shard."""

    def __init__(self, loader):
        self.loader, self.device = loader, loader.device
        self.shard_size = self.global_size = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for global_size, (images, labels) in zip(self.loader.batch_sizes(), self.loader):
            self.shard_size, self.global_size = len(labels), global_size
            yield images, labels

    def loss(self, logits, labels):
        """The shard's mean cross-entropy, whose gradient is that of the shard's share of the global batch's mean
        loss (:func:`shard_loss`)."""
        return shard_loss(logits, labels, self.shard_size / max(self.global_size, 1))


def shard_loss(logits, labels, share: float):
    """The mean cross-entropy of this rank's shard as its value, and as its gradient that of ``share`` (the shard's
    part of the global batch) times it: summed over the ranks, the gradients are those of the global batch's mean
    loss. The gradient must be scaled before backward, not after: a synchronized normalization layer's backward sums
    every rank's upstream gradient, which must all be of the one global loss. An empty shard gives 0, still
    connected to the model (its backward must run too: synchronized layers' collectives wait for it)."""
    if len(labels) == 0:
        return (logits * 0.0).sum()
    loss = F.cross_entropy(logits, labels)
    return loss * share + (loss * (1.0 - share)).detach()     # the value of loss, the gradient of share · loss


class SummedOverRanks:
    """An optimizer whose step first sums every rank's gradients (each of its share of the global loss) over the
    ranks, in one all_reduce: the gradients of the global batch's mean loss."""

    def __init__(self, optimizer, comm):
        self.optimizer, self.comm = optimizer, comm
        self.params = optimizer.params

    lr = property(lambda self: self.optimizer.lr, lambda self, value: setattr(self.optimizer, "lr", value))

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        dist.all_reduce_gradients(self.params, self.comm)
        self.optimizer.step()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


class ShareBuffers(Callback):
    """Per-shard batch norm leaves each rank its own running statistics: rank 0's go to every rank after each
    epoch, before anything evaluates or saves them."""

    def __init__(self, model, comm):
        self.model, self.comm = model, comm

    def on_epoch_end(self, epoch, row):
        for tensor in self.model.buffers():
            device = backend.device_of(tensor.data)
            tensor.data = backend.to_device(self.comm.broadcast(backend.to_numpy(tensor.data)), device)


def prepare_model(model, comm, sync_bn: bool, first_image, device):
    """The model every rank trains: synchronized normalization (unless per-shard batch norm is asked for), and lazy
    layers given their sizes by one image, so that rank 0's state can go out to the others."""
    if sync_bn:
        model = convert_sync(model, comm)
    if not all(is_materialized(t) for t in (*model.parameters(), *model.buffers())):
        with no_grad():
            model.eval()(Tensor(backend.to_device(first_image.astype(numpy.float32), device)))
            model.train()
    return model


def share_state(comm, state):
    """Rank 0's ``state`` (a dict, or None when rank 0 could not prepare it) on every rank; a rank whose rank 0
    failed stops here, with rank 0 saying why."""
    state = comm.broadcast(state)
    if state is None:
        error = dist.StoppedElsewhere("rank 0 could not resume (it said why)")
        error.agreed = True
        raise error
    return state


def reducer(comm):
    """``reduce`` for :func:`tinybn.app.loop.fit`: the accumulator's sums over every rank."""
    return lambda totals: comm.all_reduce(numpy.asarray(totals, numpy.float64))


def data_parallel(loader, optimizer, comm) -> dict:
    """What :func:`tinybn.app.loop.fit` is given to train on ``comm``'s ranks, as keyword arguments: this rank's
    shards of ``loader``'s batches, ``optimizer`` summing the gradients over the ranks, the shard's loss and the
    accumulator's reduction."""
    shards = Shards(loader)
    return {"batches": shards, "optimizer": SummedOverRanks(optimizer, comm), "loss_fn": shards.loss,
            "reduce": reducer(comm)}
