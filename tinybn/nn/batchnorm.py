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
prediction time", is :func:`tinybn.nn.recompute_batch_norm_statistics` ("precise BN").

Every layer here is a :class:`~tinybn.nn.norm.Normalization`: it says, once, what the tools need to know of
it (its running statistics, how they pool, how it synchronizes over ranks, folds, maps to PyTorch).
"""
from __future__ import annotations

import numpy

from .. import backend
from .. import functional as F
from ..functional.batchnorm import DEFAULT_EPS, DEFAULT_MOMENTUM
from ..autograd import Tensor
from .layers import check_input, check_size
from .module import Module, UninitializedBuffer, UninitializedParameter, is_materialized
from .norm import Normalization, convert_sync, per_channel_moments, twin


class _BatchNormBase(Normalization):
    num_dims = None  # 2 or 4
    running_statistics = ("moving_mean", "moving_var")
    batch_dependent = pools_statistics = True
    affine_parameters = ("gamma", "beta")
    torch_names = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
                   "num_batches_tracked": "num_batches_tracked"}

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

    # -- what the tools ask (tinybn.nn.norm)
    def batch_moments(self, x):
        return per_channel_moments(x, (0,) if x.ndim == 2 else (0, 2, 3))

    def set_statistics(self, pooled):
        shape, dtype, xp = self.moving_mean.shape, self.moving_mean.dtype, backend.get_array_module(self.moving_mean.data)
        self.moving_mean.data = xp.asarray(pooled.mean).reshape(shape).astype(dtype)
        self.moving_var.data = xp.asarray(pooled.variance).reshape(shape).astype(dtype)

    def reset_running_stats(self):
        xp = backend.get_array_module(self.moving_mean.data)
        self.moving_mean.data = xp.zeros_like(self.moving_mean.data)
        self.moving_var.data = xp.ones_like(self.moving_var.data)
        self.num_batches_tracked.data = xp.zeros_like(self.num_batches_tracked.data)

    def synchronized(self, comm):
        return twin(self, SyncBatchNorm, comm=comm, num_dims=self.num_dims, _param_shape=self._param_shape)

    def prediction_affine(self):
        scale = _host64(self.gamma) / numpy.sqrt(_host64(self.moving_var) + self.eps)
        return scale, _host64(self.beta) - scale * _host64(self.moving_mean)

    def to_torch(self, name, value):
        return value.reshape(-1) if value.ndim > 0 else value

    def from_torch(self, name, value):
        """PyTorch's (C,) and the chapter layer's (1, C[, 1, 1]) both fit either kind of tinybn BN layer."""
        if value.ndim == 0:
            return value
        if value.ndim > 1 and (value.shape[0] != 1 or any(n != 1 for n in value.shape[2:])):
            return None
        return value.reshape(self._param_shape(value.shape[0] if value.ndim == 1 else value.shape[1]))

    def torch_settings(self, torch_layer):
        settings = super().torch_settings(torch_layer)
        if hasattr(torch_layer, "momentum"):      # PyTorch weighs the new batch; None: a cumulative average
            momentum = torch_layer.momentum
            settings["momentum"] = None if momentum is None else 1.0 - float(momentum)
        return settings

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


def _host64(tensor):
    """A host float64 copy of a per-channel tensor, flat."""
    return backend.to_numpy(tensor.data).astype(numpy.float64).reshape(-1)


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
    uses them and communicates nothing. ``comm``: a :class:`tinybn.communicator.Communicator`, by default
    the one :func:`tinybn.distributed.init` made, looked up when the layer is called; with a single process it
    is plain batch norm. Every rank must run every training step (even with an empty shard): the layer's
    collectives wait for all of them.

    :meth:`convert_sync_batchnorm` turns the normalization layers of an existing model into their synchronized
    forms (this one for batch norm).
    """
    num_dims = None        # 2 or 4, as the input comes
    synchronizes = True

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
                                   momentum=momentum, eps=self.eps, comm=self.communicator(),
                                   check_channels=not checked)
        if self.training:
            object.__setattr__(self, "_channels_agreed", True)
        return result

    def synchronized(self, comm):
        return self if comm is self.comm else twin(self, type(self), comm=comm)

    @classmethod
    def convert_sync_batchnorm(cls, module: Module, comm=None) -> Module:
        """``module`` with every normalization layer in its synchronized form (:func:`tinybn.nn.convert_sync`:
        batch norm becomes this layer, batch renorm and decorrelated BN their synchronized forms, layer and group
        norm stay), sharing γ, β and the moving statistics (the same tensor objects, in the same shapes: state
        dicts and optimizers built before or after stay valid, and checkpoints load either way). Returns the new
        root when ``module`` is itself such a layer."""
        return convert_sync(module, comm)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.comm is None else f", comm={self.comm!r}")
