"""Precise statistics: every normalization layer's running statistics recomputed over many training batches.

Moving averages lag behind the weights: at a large learning rate they average batches seen by several older
versions of the network, and prediction mode suffers. The chapter's remedy, "after training, use the entire
dataset to compute stable estimates of the statistics and fix them at prediction time", is
:func:`recompute_batch_norm_statistics` ("precise BN"). Which layers take part, what they pool and how is
theirs to say (:class:`tinybn.nn.norm.Normalization`): this module only runs the pass.
"""
from __future__ import annotations

import itertools

import numpy

from .. import backend
from ..autograd import Tensor, no_grad
from ..functional.batchnorm import BatchTooSmallError
from ..functional.moments import pool, pool_across_ranks
from .norm import normalization_layers, per_channel_moments


def recompute_batch_norm_statistics(model, batches, num_batches: int | None = None, comm=None) -> int:
    """Replace the running statistics of every normalization layer that pools them (batch norm of every kind,
    batch renorm, decorrelated BN: ``pools_statistics``) by the exact statistics of ``batches``.

    With the weights frozen and no graph recorded, the model runs over ``batches`` (any iterable of inputs, as
    tensors, arrays, PyTorch tensors or anything ``numpy.asarray`` takes, or of ``(inputs, labels, ...)`` tuples
    or lists, as tinybn's and PyTorch's DataLoaders yield them; only the first ``num_batches`` when given). Each
    such layer normalizes each batch as in training, and a forward hook hands the batch's moments to this pass;
    its new statistics are those of every value it saw, over all the batches together
    (:func:`tinybn.functional.moments.pool`, in float64), so they do not depend on how the data was cut into
    batches and include the spread between the batches' means. Decorrelated BN pools the covariance and keeps the
    whitening that training mode would compute for one batch with it. The other layers run in prediction mode
    (no dropout), as they will when these statistics are used.

    Several ranks: a synchronized layer (``comm`` set) normalizes each batch over all the ranks, as in training,
    so the ranks go through their batches in step (a rank that runs out stops them all); its statistics pool
    every rank's values, and are the same on every rank. ``comm`` pools the other layers' statistics across its
    ranks too (each rank passing its own batches). Every rank must then call this.

    Every layer's and the model's mode is restored, and no statistic changes unless the whole pass succeeds (a
    lazy layer takes its size from the first batch, as on any first call, and keeps its initial statistics if
    the pass fails). A layer that no batch reached keeps its statistics. Returns the number of batches this
    process used.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, (int, numpy.integer))
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a whole number of at least 1 or None (all), got {num_batches!r}")
    layers = list({id(layer): layer for _, layer in normalization_layers(model) if layer.pools_statistics}.values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no normalization layer whose statistics could be recomputed "
                         f"(batch norm, batch renorm or decorrelated BN)")
    names = {id(layer): name for name, layer in normalization_layers(model)}
    parts = {id(layer): [] for layer in layers}
    lazy = [layer for layer in layers if any(t is None for t in _buffers(layer))]
    used = _pass(model, layers, parts, batches, num_batches)
    pooled = {}
    for layer in layers:
        seen = [part for part in parts[id(layer)] if part.count]
        ranks = layer.communicator() or comm
        pooled[id(layer)] = _across_ranks(pool(seen) if seen else None, layer, ranks, names[id(layer)])
    if not any(value is not None for value in pooled.values()):
        raise ValueError("recompute_batch_norm_statistics: no batch held an example, so there is nothing to average")
    for layer in layers:                         # every check before any statistic changes
        moments = pooled[id(layer)]
        if moments is not None and not (numpy.isfinite(backend.to_numpy(moments.mean)).all()
                                        and numpy.isfinite(backend.to_numpy(moments.m2)).all()):
            raise ValueError(f"recompute_batch_norm_statistics: {names[id(layer)]} ({layer!r}) saw a NaN or an "
                             f"infinity in the batches; its statistics, and every other layer's, are left as they were")
    for layer in layers:
        if pooled[id(layer)] is not None:
            if any(t is None for t in _buffers(layer)):    # lazy, and no batch reached it here: the others' size
                layer._materialize(pooled[id(layer)].mean.size)
            elif layer in lazy:
                layer.reset_running_stats()      # took its size in this pass: its counters start from 0
            layer.set_statistics(pooled[id(layer)])
    return used


def _across_ranks(local, layer, comm, name):
    """This layer's moments over every rank's values, the same on every rank (every rank calls this, with or without
    values of its own: a rank whose lazy layer saw no batch learns its size from the others); None without values."""
    if comm is None or comm.world_size == 1:
        return local
    unsized = any(t is None for t in _buffers(layer))
    size = local.mean.size if local is not None else (0 if unsized else layer.no_moments().mean.size)
    sizes = comm.all_gather(numpy.array([size], numpy.float64)).reshape(-1)
    channels = int(sizes.max())
    if channels == 0:
        return None
    if bool(((sizes != channels) & (sizes != 0)).any()):
        raise ValueError(f"recompute_batch_norm_statistics: the ranks disagree on the channels of {name} "
                         f"({', '.join(str(int(c)) for c in sizes)}); every rank must run the same model")
    if local is None:
        local = per_channel_moments(numpy.zeros((0, channels)), (0,)) if unsized else layer.no_moments()
    pooled = pool_across_ranks(local, comm, matrix=local.m2.ndim == 2)
    return pooled if pooled.count else None


def _pass(model, layers, parts, batches, num_batches) -> int:
    """Run the model over the batches with ``layers`` in training mode and the rest in prediction mode, collecting
    each layer's batch moments into ``parts``; everything the pass changed in the model is put back."""
    def collect(layer, inputs, output):
        parts[id(layer)].append(layer.batch_moments(inputs[0].data if isinstance(inputs[0], Tensor) else inputs[0]))

    modes = [(module, module.training) for module in model.modules()]
    lazy = [layer for layer in layers if not all(t is not None for t in _buffers(layer))]
    saved = {id(layer): [t.data.copy() for t in _buffers(layer)] for layer in layers if layer not in lazy}
    handles = [layer.register_forward_hook(collect) for layer in layers]
    lockstep = _lockstep_comm(layers)
    try:
        model.eval()
        for layer in layers:
            object.__setattr__(layer, "training", True)
        with no_grad():
            return _run(model, batches, num_batches, lockstep)
    except BaseException:
        for layer in lazy:                   # took its size in this pass: back to its initial statistics
            if all(t is not None for t in _buffers(layer)):
                layer.reset_running_stats()
        raise
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            if id(layer) in saved:
                for tensor, value in zip(_buffers(layer), saved[id(layer)]):
                    tensor.data = value
        for module, mode in modes:
            object.__setattr__(module, "training", mode)


def _buffers(layer) -> list:
    """The layer's buffers (running statistics and counters) as tensors; None for one not materialized yet."""
    from .module import is_materialized

    return [tensor if is_materialized(tensor) else None for tensor in layer._buffers.values() if tensor is not None]


def _lockstep_comm(layers):
    """The communicator the synchronized layers normalize over, when there are several ranks; else None."""
    for layer in layers:
        comm = layer.communicator() if layer.synchronizes else None
        if comm is not None and comm.world_size > 1:
            return comm
    return None


def _run(model, batches, num_batches, lockstep) -> int:
    """Feed the batches to the model; returns how many were used. With ``lockstep`` every rank feeds its batch at
    the same time (the synchronized layers' collectives wait for all), and all stop when one runs out."""
    used = 0
    for batch in (batches if num_batches is None else itertools.islice(batches, int(num_batches))):
        if lockstep is not None and not _all_have_one(lockstep, True):
            break
        inputs = as_input(batch, model.device)
        if inputs.shape and inputs.shape[0] == 0 and lockstep is None:
            continue                  # an empty batch has no statistics, and is not counted
        try:
            model(inputs)
        except BatchTooSmallError as error:
            raise ValueError(f"recompute_batch_norm_statistics: batch {used + 1} ({tuple(inputs.shape)}) is too small "
                             f"to normalize as in training: {error.reason} Leave it out (a loader's last batch of "
                             f"one example, say)") from None
        used += 1
    else:
        if lockstep is not None:
            while _all_have_one(lockstep, False):        # the others still had batches: none is run
                pass
    return used


def _all_have_one(comm, have: bool) -> bool:
    """Whether every rank has another batch (one small collective, every rank each time). A rank that has none
    says so until every rank has said it."""
    count = comm.all_reduce(numpy.array([1.0 if have else 0.0]))[0]
    return count == comm.world_size


def as_input(batch, device) -> Tensor:
    """The inputs of a batch as a tensor on ``device``: a tensor, an array (NumPy, CuPy, PyTorch) or anything
    ``numpy.asarray`` takes, or the first item of an ``(inputs, labels, ...)`` tuple or list."""
    if isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "shape"):
        batch = batch[0]
    if isinstance(batch, Tensor):
        return batch
    if hasattr(batch, "detach") and hasattr(batch, "cpu"):        # a PyTorch tensor, on any device
        batch = batch.detach().cpu().numpy()
    device_array = hasattr(batch, "__cuda_array_interface__")
    return Tensor(backend.to_device(batch if isinstance(batch, numpy.ndarray) or device_array
                                    else numpy.asarray(batch), device))
