"""Batch-norm layers: parameters, moving averages, train/eval — the math is in tinybn.functional.batchnorm.

* :class:`BatchNorm` is the chapter's from-scratch layer: you give ``num_features`` and
  ``num_dims`` (2 after a dense layer, 4 after a convolution) and its tensors have the broadcast
  shapes (1, C) or (1, C, 1, 1), so ``net[1].gamma.reshape(-1)`` shows the learned scales.
* :class:`BatchNorm1d` and :class:`BatchNorm2d` are the concise layers: ``num_features`` may be
  left out and is read from the first input; their tensors have shape (C,), as in PyTorch.

In training mode (``model.train()``, the default) a layer normalizes with the statistics of the
current batch and folds them into ``moving_mean``/``moving_var``; in prediction mode
(``model.eval()``) it normalizes with those moving averages and changes nothing.

The moving-average convention (``momentum`` weighs the OLD average, default 0.9 = PyTorch's
0.1) is documented once, in :mod:`tinybn.functional.batchnorm`. ``momentum=None`` keeps an exact
cumulative average instead: after k training batches the moving statistics are the plain mean of
the k batch statistics.

Moving averages lag behind the weights: at a large learning rate they average batches seen by
several older versions of the network, and prediction mode suffers. The chapter's remedy, "after
training, use the entire dataset to compute stable estimates of the statistics and fix them at
prediction time", is :func:`recompute_batch_norm_statistics` ("precise BN").
"""
from __future__ import annotations

import itertools

import numpy

from .. import backend
from .. import functional as F
from ..functional.batchnorm import DEFAULT_EPS, DEFAULT_MOMENTUM
from ..functional.whitening import whitening_matrix
from ..autograd import Tensor, no_grad
from .layers import check_input, check_size
from .module import Module, UninitializedBuffer, UninitializedParameter, is_materialized


class _BatchNormBase(Module):
    num_dims = None  # 2 or 4

    def __init__(self, num_features, momentum, eps, device, dtype):
        super().__init__()
        if num_features is not None:
            check_size(type(self).__name__, "num_features", num_features)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (the weight of the old moving average) or None, got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be positive (it keeps 1/√(σ² + eps) finite for a constant channel), got {eps}")
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        object.__setattr__(self, "_device", backend.resolve_device(device)[0])
        object.__setattr__(self, "_dtype", numpy.dtype(dtype))
        # Real objects from the start, so that an optimizer built now trains them; a lazy layer fills them
        # in place on its first call.
        self.gamma, self.beta = UninitializedParameter(), UninitializedParameter()
        for name in ("moving_mean", "moving_var", "num_batches_tracked"):
            self.register_buffer(name, UninitializedBuffer())
        if num_features is not None:
            self._materialize(num_features)

    def _param_shape(self, num_features):
        raise NotImplementedError

    def _materialize(self, num_features: int) -> None:
        """Give γ = 1, β = 0, moving mean 0 and moving variance 1 for ``num_features`` channels, in place."""
        shape, device, dtype = self._param_shape(num_features), self._device, self._dtype
        self.num_features = num_features
        for tensor, value in ((self.gamma, numpy.ones(shape, dtype)), (self.beta, numpy.zeros(shape, dtype)),
                              (self.moving_mean, numpy.zeros(shape, dtype)), (self.moving_var, numpy.ones(shape, dtype)),
                              (self.num_batches_tracked, numpy.zeros((), numpy.int64))):
            tensor.materialize(backend.to_device(value, device))

    def _shape_from_state(self, name, state, dotted_name):
        gamma = state.get(dotted_name[:len(dotted_name) - len(name)] + "gamma")
        if gamma is None:
            return None
        return () if name == "num_batches_tracked" else self._param_shape(int(numpy.prod(numpy.shape(gamma))))

    def _materialize_for_loading(self, state, prefix):
        if not is_materialized(self.gamma):
            self._materialize(int(numpy.prod(numpy.shape(state[f"{prefix}.gamma" if prefix else "gamma"]))))

    def _check_input(self, x, channels):
        check_input(self, x, self.num_dims, "(N, C)" if self.num_dims == 2 else "(N, C, H, W)", channels)

    def forward(self, x):
        data = x.data if isinstance(x, Tensor) else x
        if not is_materialized(self.gamma):  # concise layer: the size comes from the first input
            self._check_input(x, None)
            object.__setattr__(self, "_device", backend.device_of(data))
            self._materialize(data.shape[1])
        self._check_input(x, self.num_features)
        sink = self.__dict__.get("_statistics_sink")
        if sink is not None and self.training:   # recompute_batch_norm_statistics: hand over the batch's statistics
            return self._forward_into(sink, x, data)
        momentum = self.momentum
        if momentum is None:  # cumulative average: the k-th batch gets weight 1/k
            momentum = 1.0 - 1.0 / (int(self.num_batches_tracked.item()) + 1)
        y, new_mean, new_var, count = self._normalize(x, momentum)
        if self.training and count > 0:    # an empty batch has no statistics to count
            self.moving_mean.data, self.moving_var.data = new_mean.data, new_var.data
            self.num_batches_tracked.data = self.num_batches_tracked.data + 1
        return y

    def _normalize(self, x, momentum):
        """``(y, new_moving_mean, new_moving_var, values per channel in the batch)``."""
        y, new_mean, new_var = F.batch_norm(x, self.gamma, self.beta, self.moving_mean, self.moving_var,
                                            training=self.training, momentum=momentum, eps=self.eps)
        data = x.data if isinstance(x, Tensor) else x
        return y, new_mean, new_var, data.size // self.num_features

    def _forward_into(self, sink, x, data):
        """Normalize with the batch's statistics, give them and the number of values per channel to ``sink``,
        and leave the layer's buffers alone. (Starting from zeros and ones with momentum 0 makes the "new
        moving averages" exactly the batch's mean and variance, whatever the buffers hold.)"""
        xp = backend.get_array_module(data)
        zeros = xp.zeros(self.moving_mean.shape, self.moving_mean.dtype)
        y, mean, var = F.batch_norm(x, self.gamma, self.beta, zeros, xp.ones_like(zeros), training=True,
                                    momentum=0.0, eps=self.eps)
        if data.size > 0:
            sink(self, mean.data, var.data, data.size // self.num_features)
        return y

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


class BatchNorm(_BatchNormBase):
    """The chapter's layer: ``BatchNorm(num_features, num_dims)`` with num_dims 2 (dense) or 4 (conv).

    ``gamma``, ``beta``, ``moving_mean`` and ``moving_var`` have shape (1, C) or (1, C, 1, 1).
    """

    def __init__(self, num_features: int, num_dims: int, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS, device=None,
                 dtype=numpy.float32):
        if num_dims not in (2, 4):
            raise ValueError(f"BatchNorm num_dims must be 2 (after a dense layer) or 4 (after a convolution), "
                             f"got {num_dims}")
        object.__setattr__(self, "num_dims", num_dims)  # needed by _param_shape during __init__
        super().__init__(num_features, momentum, eps, device, dtype)

    def _param_shape(self, num_features):
        return (1, num_features) if self.num_dims == 2 else (1, num_features, 1, 1)

    def extra_repr(self):
        return f"{self.num_features}, num_dims={self.num_dims}, momentum={self.momentum}, eps={self.eps}"


class BatchNorm1d(_BatchNormBase):
    """Concise batch norm for (N, C) input; ``num_features`` is inferred from the first batch when omitted."""
    num_dims = 2

    def __init__(self, num_features: int | None = None, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS, device=None,
                 dtype=numpy.float32):
        super().__init__(num_features, momentum, eps, device, dtype)

    def _param_shape(self, num_features):
        return (num_features,)


class BatchNorm2d(BatchNorm1d):
    """Concise batch norm for (N, C, H, W) input, per channel; ``num_features`` inferred when omitted."""
    num_dims = 4


class SyncBatchNorm(_BatchNormBase):
    """Batch norm over the global batch of a data-parallel job: every rank normalizes its shard with the
    statistics of all the ranks' shards together (PyTorch's ``SyncBatchNorm``), for (N, C) or (N, C, H, W)
    input; ``num_features`` may be left out and is read from the first input.

    Training mode gathers each rank's count, mean and sum of squared deviations per channel in one
    collective, and the backward sums Σdy and Σdy·x̂ in one more (:mod:`tinybn.functional.syncbatchnorm`);
    the moving averages come from the global statistics and are the same on every rank. Prediction mode
    uses them and communicates nothing. ``comm``: a :class:`tinybn.distributed.Communicator`, by default
    the one :func:`tinybn.distributed.init` made when the layer is first called; with a single process it
    is plain batch norm. Every rank must run every training step (even with an empty shard): the layer's
    collectives wait for all of them.

    :meth:`convert_sync_batchnorm` turns the batch-norm layers of an existing model into this one.
    """
    num_dims = None        # 2 or 4, as the input comes

    def __init__(self, num_features: int | None = None, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS, comm=None,
                 device=None, dtype=numpy.float32):
        super().__init__(num_features, momentum, eps, device, dtype)
        object.__setattr__(self, "comm", comm)

    def _param_shape(self, num_features):
        return (num_features,)

    def _check_input(self, x, channels):
        ndim = getattr(x.data if isinstance(x, Tensor) else x, "ndim", None)
        if self.num_dims is None and ndim not in (2, 4):
            raise ValueError(f"{self!r} expects a 2-D input of shape (N, C) or a 4-D one of shape (N, C, H, W), "
                             f"got shape {tuple(getattr(x, 'shape', ()))}")
        check_input(self, x, self.num_dims or ndim, "(N, C)" if (self.num_dims or ndim) == 2 else "(N, C, H, W)",
                    channels)

    def _normalize(self, x, momentum):
        checked = self.__dict__.get("_channels_agreed", False)      # the ranks agree on the channels once
        result = F.sync_batch_norm(x, self.gamma, self.beta, self.moving_mean, self.moving_var, training=self.training,
                                   momentum=momentum, eps=self.eps, comm=self.comm, check_channels=not checked)
        if self.training:
            object.__setattr__(self, "_channels_agreed", True)
        return result

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, comm=None) -> Module:
        """``module`` with every batch-norm layer replaced by a SyncBatchNorm that shares its γ, β and moving
        statistics (the same tensor objects, in the same shapes: state dicts and optimizers built before or after
        stay valid, and checkpoints load either way). Returns the new root when ``module`` is itself a BN layer."""
        done = {}                     # a layer used in two places stays one layer

        def converted(layer):
            if not isinstance(layer, _BatchNormBase) or isinstance(layer, SyncBatchNorm):
                return layer
            if id(layer) in done:
                return done[id(layer)]
            sync = cls.__new__(cls)
            Module.__init__(sync)
            for name in ("num_features", "momentum", "eps"):
                object.__setattr__(sync, name, getattr(layer, name))
            for name in ("_device", "_dtype", "training", "num_dims"):
                object.__setattr__(sync, name, getattr(layer, name))
            object.__setattr__(sync, "comm", comm)
            object.__setattr__(sync, "_param_shape", layer._param_shape)   # a lazy layer materializes as before
            sync.gamma, sync.beta = layer.gamma, layer.beta
            for name in ("moving_mean", "moving_var", "num_batches_tracked"):
                sync.register_buffer(name, getattr(layer, name))
            done[id(layer)] = sync
            return sync

        if isinstance(module, _BatchNormBase):
            return converted(module)
        for parent in module.modules():
            for name, child in list(parent._modules.items()):
                if child is not None and isinstance(child, _BatchNormBase):
                    setattr(parent, name, converted(child))
        return module

    def extra_repr(self):
        return super().extra_repr() + ("" if self.comm is None else f", comm={self.comm!r}")


def recompute_batch_norm_statistics(model, batches, num_batches: int | None = None) -> int:
    """Replace every batch-norm layer's moving mean and variance by the exact statistics of ``batches``.

    Batch-norm layers are tinybn's BN layers of every kind (the chapter's, the concise ones, SyncBatchNorm and
    batch renorm), and DecorrelatedBatchNorm, whose moving whitening matrix becomes the whitening of the
    covariance of all the batches together (below). InstanceNorm2d's running statistics are per-example
    statistics averaged, of another kind, and are left as they are.

    "Precise BN": with the weights frozen and no graph recorded, the model runs over ``batches``
    (any iterable of inputs, as tensors or anything ``numpy.asarray`` takes, or of ``(inputs, labels)``
    tuples as a DataLoader yields them; only the first ``num_batches`` when given; empty batches are
    skipped). Each BN layer normalizes with each batch's own statistics, as in training, and its new
    moving statistics are the mean and the (biased) variance of every value it saw, over all the
    batches together:

        μ = (1/M) Σ_values x,        σ² = (1/M) Σ_values (x − μ)²,        M = values per channel

    combined batch by batch (Chan's pairwise update, in float64), so they do not depend on how the data
    was cut into batches and include the spread between the batches' means, which an average of
    per-batch variances would miss. Decorrelated BN pools the covariance Σ = (1/M) Σ_values (x − μ)(x − μ)ᵀ
    the same way (δ² becomes δδᵀ) and keeps the whitening matrix that training mode would compute for one
    batch with that covariance (:func:`tinybn.functional.whitening.whitening_matrix`). The layers other than
    batch norm run in prediction mode (no dropout), as they will when these statistics are used.
    ``num_batches_tracked`` is left as it is.

    Every layer's and the model's mode is restored, and no statistic changes unless the whole pass
    succeeds (a lazy layer takes its size from the first batch, as on any first call). A layer that no
    batch reached keeps its statistics. Returns the number of batches used.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, (int, numpy.integer))
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a whole number of at least 1 or None (all), got {num_batches!r}")
    from .normalization import DecorrelatedBatchNorm       # (that module imports this one)
    layers = [module for module in model.modules() if isinstance(module, (_BatchNormBase, DecorrelatedBatchNorm))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no batch-norm layer whose statistics could be recomputed")
    totals = {}          # id(layer) -> [count, mean, M2] per channel (M2 a (C, C) matrix for whitening), float64

    def sink(layer, mean, var, count):
        """``var``: the batch's variance per channel, or its covariance (C, C) from decorrelated BN."""
        xp = backend.get_array_module(mean)
        mean = mean.astype(numpy.float64).reshape(-1)
        m2 = var.astype(numpy.float64) * count
        m2 = m2 if isinstance(layer, DecorrelatedBatchNorm) else m2.reshape(-1)
        if id(layer) not in totals:
            totals[id(layer)] = [count, mean, m2]
            return
        total = totals[id(layer)]
        n = total[0] + count
        delta = mean - total[1]
        spread = xp.outer(delta, delta) if m2.ndim == 2 else xp.square(delta)
        total[1] = total[1] + delta * (count / n)
        total[2] = total[2] + m2 + spread * (total[0] * count / n)
        total[0] = n

    modes = [(module, module.training) for module in model.modules()]
    used = 0
    try:
        model.eval()
        for layer in layers:
            object.__setattr__(layer, "training", True)
            object.__setattr__(layer, "_statistics_sink", sink)
        with no_grad():
            for batch in (batches if num_batches is None else itertools.islice(batches, int(num_batches))):
                inputs = batch[0] if isinstance(batch, tuple) else batch
                if not isinstance(inputs, Tensor):   # an array or a list: onto the model's device, as a tensor
                    device_array = hasattr(inputs, "__cuda_array_interface__") and not hasattr(inputs, "numpy")
                    inputs = Tensor(backend.to_device(inputs if isinstance(inputs, numpy.ndarray) or device_array
                                                      else numpy.asarray(inputs), model.device))
                if inputs.shape and inputs.shape[0] == 0:
                    continue                  # an empty batch has no statistics, and is not counted
                model(inputs)
                used += 1
    finally:
        for layer in layers:
            layer.__dict__.pop("_statistics_sink", None)
        for module, mode in modes:
            object.__setattr__(module, "training", mode)
    if used == 0:
        raise ValueError("recompute_batch_norm_statistics: no batch was given, so there is nothing to average")
    for layer in layers:
        if id(layer) in totals:
            count, mean, m2 = totals[id(layer)]
            shape, dtype = layer.moving_mean.shape, layer.moving_mean.dtype
            layer.moving_mean.data = mean.reshape(shape).astype(dtype)
            if isinstance(layer, DecorrelatedBatchNorm):
                layer.moving_whitening.data = whitening_matrix(m2 / count, layer.group_size, layer.iterations,
                                                               layer.eps).astype(dtype)
            else:
                layer.moving_var.data = (m2 / count).reshape(shape).astype(dtype)
    return used
