"""The normalization family beyond batch norm: the layers around the mathematics in tinybn.functional.

* :class:`LayerNorm`, :class:`GroupNorm`, :class:`InstanceNorm2d`: statistics per example, so they do not
  depend on the batch (PyTorch's names, arguments and parameters ``weight``/``bias``).
* :class:`BatchRenorm1d`, :class:`BatchRenorm2d`: batch norm corrected towards its moving averages in training
  (tinybn's batch-norm layers, with ``gamma``/``beta``/``moving_mean``/``moving_var``); :class:`SyncBatchRenorm`
  over the ranks of a data-parallel job.
* :class:`DecorrelatedBatchNorm`: whitening of groups of channels (a full-rank covariance estimate);
  :class:`SyncDecorrelatedBatchNorm` over the ranks.

Each is a :class:`~tinybn.nn.norm.Normalization` and answers, once, what the tools ask of it.
"""
from __future__ import annotations

import numbers

import numpy

from .. import backend
from .. import functional as F
from ..autograd import Tensor
from ..functional.batchrenorm import DEFAULT_MOMENTUM as RENORM_MOMENTUM
from ..functional.batchrenorm import renorm_limits
from ..functional.batchnorm import DEFAULT_EPS, DEFAULT_MOMENTUM, BatchTooSmallError, moving_average
from ..functional.groupnorm import instance_statistics
from ..functional.layernorm import normalized_shape_tuple
from ..functional.moments import covariance_moments
from ..functional.syncbatchnorm import sync_batch_renorm, sync_decorrelated_batch_norm
from ..functional.whitening import DEFAULT_ITERATIONS, _channels_first, whitening_matrix
from .batchnorm import BatchNorm1d, SyncBatchNorm, _BatchNormBase, _host64
from .layers import check_input, check_size
from .module import Parameter
from .norm import Normalization, twin

def _tensor(value, device):
    return backend.to_device(value, device)


def _check_momentum(layer, momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{layer}: momentum must be a number in [0, 1] (the weight of the old average), got "
                         f"{momentum!r}" + ("; momentum=None (a cumulative average) is offered by the batch-norm "
                                            "layers only" if momentum is None else ""))


def _check_eps(layer, eps):
    if not eps > 0:
        raise ValueError(f"{layer}: eps must be positive (it keeps 1/√(σ² + eps) finite), got {eps}")


class LayerNorm(Normalization):
    """``LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True)``: each example standardized over its
    last axes, which must equal ``normalized_shape``; ``weight`` (ones) and ``bias`` (zeros) of that shape."""

    def __init__(self, normalized_shape, eps=DEFAULT_EPS, elementwise_affine: bool = True, device=None,
                 dtype=numpy.float32):
        super().__init__()
        self.normalized_shape = normalized_shape_tuple(normalized_shape)
        _check_eps("LayerNorm", eps)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        shape = self.normalized_shape
        self.register_parameter("weight", Parameter(_tensor(numpy.ones(shape, dtype), device)) if elementwise_affine
                                else None)
        self.register_parameter("bias", Parameter(_tensor(numpy.zeros(shape, dtype), device)) if elementwise_affine
                                else None)

    torch_names = {"weight": "weight", "bias": "bias"}

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(Normalization):
    """``GroupNorm(num_groups, num_channels, eps=1e-5, affine=True)``: each example's channels standardized in
    ``num_groups`` groups (which must divide ``num_channels``); ``weight`` and ``bias`` per channel."""

    def __init__(self, num_groups: int, num_channels: int, eps=DEFAULT_EPS, affine: bool = True, device=None,
                 dtype=numpy.float32):
        super().__init__()
        check_size("GroupNorm", "num_groups", num_groups)
        check_size("GroupNorm", "num_channels", num_channels)
        num_groups, num_channels = int(num_groups), int(num_channels)
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups {num_groups} does not divide num_channels {num_channels}")
        _check_eps("GroupNorm", eps)
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.register_parameter("weight", Parameter(_tensor(numpy.ones(num_channels, dtype), device)) if affine
                                else None)
        self.register_parameter("bias", Parameter(_tensor(numpy.zeros(num_channels, dtype), device)) if affine
                                else None)

    def forward(self, x):
        data = x.data if isinstance(x, Tensor) else x
        if getattr(data, "ndim", 0) < 2 or data.shape[1] != self.num_channels:
            raise ValueError(f"{self!r} expects an input of shape (N, {self.num_channels}, ...), got shape "
                             f"{tuple(getattr(data, 'shape', ()))}")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    torch_names = {"weight": "weight", "bias": "bias"}

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class InstanceNorm2d(Normalization):
    """``InstanceNorm2d(num_features, eps=1e-5, momentum=0.9, affine=False, track_running_stats=False)``: each
    channel of each example standardized over its positions — group norm with one group per channel.

    As in PyTorch, ``track_running_stats=True`` keeps moving averages of the per-example statistics (in
    tinybn's convention: ``momentum`` weighs the old value, the variance is biased) and prediction mode
    normalizes with them; otherwise both modes use each example's own statistics. Synchronized over the ranks
    of a data-parallel job (``comm``), the averages take every rank's examples (one all_reduce per training
    step; the output, per example, needs none).
    """
    torch_names = {"weight": "weight", "bias": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
                   "num_batches_tracked": "num_batches_tracked"}

    def __init__(self, num_features: int, eps=DEFAULT_EPS, momentum=DEFAULT_MOMENTUM, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=numpy.float32):
        super().__init__()
        check_size("InstanceNorm2d", "num_features", num_features)
        num_features = int(num_features)
        _check_eps("InstanceNorm2d", eps)
        _check_momentum("InstanceNorm2d", momentum)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        for name, value in (("weight", numpy.ones), ("bias", numpy.zeros)):
            self.register_parameter(name, Parameter(_tensor(value(num_features, dtype), device)) if affine else None)
        if track_running_stats:
            self.register_buffer("moving_mean", Tensor(_tensor(numpy.zeros(num_features, dtype), device)))
            self.register_buffer("moving_var", Tensor(_tensor(numpy.ones(num_features, dtype), device)))
            self.register_buffer("num_batches_tracked", Tensor(_tensor(numpy.zeros((), numpy.int64), device)))
            object.__setattr__(self, "running_statistics", ("moving_mean", "moving_var"))

    def forward(self, x):
        check_input(self, x, 4, "(N, C, H, W)", self.num_features)
        data = x.data if isinstance(x, Tensor) else x
        if self.training and data.size and data.shape[2] * data.shape[3] == 1:
            raise BatchTooSmallError(f"{self!r} in training mode needs more than one position per channel, got an "
                                     f"input of shape {tuple(data.shape)}: every output would be 0 and nothing could "
                                     f"be learned.", "Use larger images, or switch the layer to eval mode.")
        if self.track_running_stats and not self.training:
            xp = backend.get_array_module(data)
            ones = xp.ones(self.num_features, self.moving_mean.dtype)
            gamma = self.weight if self.affine else ones
            beta = self.bias if self.affine else ones * 0
            return F.batch_norm(x, gamma, beta, self.moving_mean, self.moving_var, training=False, eps=self.eps)[0]
        y = F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)    # checks x before anything changes
        if self.track_running_stats:
            self._track(data)
        return y

    def _track(self, data):
        """Fold this batch's per-example statistics (every rank's, when synchronized) into the moving averages."""
        xp = backend.get_array_module(data)
        count = data.shape[0]
        mean, var = instance_statistics(data) if count else (xp.zeros(self.num_features), xp.zeros(self.num_features))
        comm = self.comm
        if comm is not None and comm.world_size > 1:
            sums = comm.all_reduce(xp.concatenate([xp.asarray([count], numpy.float64), mean * count, var * count]
                                                  ).astype(numpy.float64))
            count, mean, var = int(sums[0]), sums[1:1 + self.num_features], sums[1 + self.num_features:]
            mean, var = (mean / count, var / count) if count else (mean, var)
        if count > 0:
            self.moving_mean.data = moving_average(self.moving_mean.data, mean, self.momentum)
            self.moving_var.data = moving_average(self.moving_var.data, var, self.momentum)
            self.num_batches_tracked.data = self.num_batches_tracked.data + 1

    # -- what the tools ask (tinybn.nn.norm)
    def reset_running_stats(self):
        if self.track_running_stats:
            xp = backend.get_array_module(self.moving_mean.data)
            self.moving_mean.data = xp.zeros_like(self.moving_mean.data)
            self.moving_var.data = xp.ones_like(self.moving_var.data)
            self.num_batches_tracked.data = xp.zeros_like(self.num_batches_tracked.data)

    def synchronized(self, comm):
        """Without running statistics there is nothing to agree on; with them, the averages take every rank's
        examples."""
        return twin(self, InstanceNorm2d, comm=comm) if self.track_running_stats else self

    def prediction_affine(self):
        if not self.track_running_stats:
            return super().prediction_affine()
        weight = _host64(self.weight) if self.affine else 1.0
        bias = _host64(self.bias) if self.affine else 0.0
        scale = weight / numpy.sqrt(_host64(self.moving_var) + self.eps)
        return scale * numpy.ones(self.num_features), bias - scale * _host64(self.moving_mean)

    def torch_settings(self, torch_layer):
        if not hasattr(torch_layer, "momentum") or (torch_layer.momentum is None and not self.track_running_stats):
            return super().torch_settings(torch_layer)        # a momentum nothing uses is not taken
        if torch_layer.momentum is None:
            raise ValueError(f"{self!r}: PyTorch's momentum=None (a cumulative average) has no counterpart in tinybn's "
                             f"InstanceNorm2d; give the PyTorch layer a momentum")
        return {**super().torch_settings(torch_layer), "momentum": 1.0 - float(torch_layer.momentum)}

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class _BatchRenormBase(_BatchNormBase):
    def __init__(self, num_features, r_max, d_max, warmup_steps, momentum, eps, device, dtype):
        if not r_max >= 1.0 or not d_max >= 0.0:
            raise ValueError(f"{type(self).__name__}: r_max must be at least 1 and d_max at least 0 (1 and 0 are "
                             f"batch norm), got r_max={r_max}, d_max={d_max}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}: warmup_steps must be a whole number of at least 0, got "
                             f"{warmup_steps!r}")
        _BatchNormBase.__init__(self, num_features, momentum, eps, device, dtype)   # not the MRO's next: a
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps      # SyncBatchRenorm's is SyncBN

    def limits(self) -> tuple[float, float]:
        """r_max and d_max for the next training step: the warm-up counts the batches this layer has normalized."""
        return renorm_limits(int(self.num_batches_tracked.item()), self.r_max, self.d_max, self.warmup_steps)

    def _normalize(self, x, momentum):
        r_max, d_max = self.limits()
        y, new_mean, new_var = F.batch_renorm(x, self.gamma, self.beta, self.moving_mean, self.moving_var,
                                              training=self.training, r_max=r_max, d_max=d_max, momentum=momentum,
                                              eps=self.eps)
        data = x.data if isinstance(x, Tensor) else x
        return y, new_mean, new_var, data.size // self.num_features

    torch_names = None        # PyTorch has no batch renorm

    def synchronized(self, comm):
        return twin(self, SyncBatchRenorm, comm=comm, num_dims=self.num_dims, _param_shape=self._param_shape)

    def extra_repr(self):
        return (f"{self.num_features}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"momentum={self.momentum}, eps={self.eps}")


class BatchRenorm1d(_BatchRenormBase, BatchNorm1d):
    """``BatchRenorm1d(num_features=None, r_max=3.0, d_max=5.0, warmup_steps=1000, momentum=0.99, eps=1e-5)``
    for (N, C) input: batch renormalization (:mod:`tinybn.functional.batchrenorm`).

    r_max and d_max grow linearly from 1 and 0 (batch norm) to the given values over the first
    ``warmup_steps`` training batches (:func:`~tinybn.functional.batchrenorm.renorm_limits`), counted by
    ``num_batches_tracked``; ``momentum`` is 0.99 because the moving averages take part in training. The
    rest is tinybn's batch-norm layer: ``num_features`` inferred when omitted, precise BN, eval mode.
    """
    num_dims = 2

    def __init__(self, num_features: int | None = None, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 1000, momentum=RENORM_MOMENTUM, eps=DEFAULT_EPS, device=None, dtype=numpy.float32):
        _BatchRenormBase.__init__(self, num_features, r_max, d_max, warmup_steps, momentum, eps, device, dtype)


class BatchRenorm2d(BatchRenorm1d):
    """Batch renormalization for (N, C, H, W) input, per channel; see :class:`BatchRenorm1d`."""
    num_dims = 4


class SyncBatchRenorm(_BatchRenormBase, SyncBatchNorm):
    """Batch renormalization over the global batch of a data-parallel job (:func:`tinybn.functional.sync_batch_renorm`):
    μ_B, σ_B, r and d come from all the ranks' shards together, so P ranks compute what one process computes on the
    whole batch. ``convert_sync_batchnorm`` makes it from :class:`BatchRenorm1d`/:class:`BatchRenorm2d` (the same
    r_max, d_max, warm-up and tensors); ``comm`` as for :class:`~tinybn.nn.SyncBatchNorm`."""

    def __init__(self, num_features: int | None = None, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 1000, momentum=RENORM_MOMENTUM, eps=DEFAULT_EPS, comm=None, device=None,
                 dtype=numpy.float32):
        _BatchRenormBase.__init__(self, num_features, r_max, d_max, warmup_steps, momentum, eps, device, dtype)
        object.__setattr__(self, "comm", comm)

    def _normalize(self, x, momentum):
        r_max, d_max = self.limits()
        return F.sync_batch_renorm(x, self.gamma, self.beta, self.moving_mean, self.moving_var, training=self.training,
                                   r_max=r_max, d_max=d_max, momentum=momentum, eps=self.eps,
                                   comm=self.communicator())

    def synchronized(self, comm):
        return self if comm is self.comm else twin(self, type(self), comm=comm)


class DecorrelatedBatchNorm(Normalization):
    """``DecorrelatedBatchNorm(num_features, group_size=16, iterations=5, momentum=0.9, eps=1e-5)`` for (N, C) or
    (N, C, H, W) input: channels whitened in groups of ``group_size`` by ``iterations`` Newton–Schulz steps
    (IterNorm; :mod:`tinybn.functional.whitening`), then scaled by ``gamma`` and shifted by ``beta``.

    Buffers: ``moving_mean`` (C,) and ``moving_whitening`` (C, C), block-diagonal, the identity at first;
    prediction mode normalizes with them. :func:`tinybn.nn.recompute_batch_norm_statistics` recomputes them
    (the mean and the whitening of many training batches together: precise statistics).
    """
    running_statistics = ("moving_mean", "moving_whitening")
    batch_dependent = pools_statistics = True
    affine_parameters = ("gamma", "beta")

    def __init__(self, num_features: int, group_size: int = 16, iterations: int = DEFAULT_ITERATIONS,
                 momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS, device=None, dtype=numpy.float32):
        super().__init__()
        check_size("DecorrelatedBatchNorm", "num_features", num_features)
        check_size("DecorrelatedBatchNorm", "group_size", group_size)
        check_size("DecorrelatedBatchNorm", "iterations", iterations)
        num_features, group_size, iterations = int(num_features), int(group_size), int(iterations)
        _check_eps("DecorrelatedBatchNorm", eps)
        _check_momentum("DecorrelatedBatchNorm", momentum)
        self.num_features, self.group_size, self.iterations = num_features, group_size, iterations
        self.momentum, self.eps = momentum, eps
        self.gamma = Parameter(_tensor(numpy.ones(num_features, dtype), device))
        self.beta = Parameter(_tensor(numpy.zeros(num_features, dtype), device))
        self.register_buffer("moving_mean", Tensor(_tensor(numpy.zeros(num_features, dtype), device)))
        self.register_buffer("moving_whitening", Tensor(_tensor(numpy.eye(num_features, dtype=dtype), device)))

    def forward(self, x):
        data = x.data if isinstance(x, Tensor) else x
        ndim = getattr(data, "ndim", None)
        check_input(self, x, ndim if ndim in (2, 4) else 4, "(N, C)" if ndim == 2 else "(N, C, H, W)",
                    self.num_features)
        y, mean, whitening, count = self._normalize(x)
        if self.training and count > 0:
            self.moving_mean.data, self.moving_whitening.data = mean.data, whitening.data
        return y

    def _normalize(self, x):
        """``(y, new_moving_mean, new_moving_whitening, values per channel in the batch)``."""
        y, mean, whitening = F.decorrelated_batch_norm(x, self.gamma, self.beta, self.moving_mean,
                                                       self.moving_whitening, training=self.training,
                                                       group_size=self.group_size, iterations=self.iterations,
                                                       momentum=self.momentum, eps=self.eps)
        data = x.data if isinstance(x, Tensor) else x
        return y, mean, whitening, data.size // self.num_features

    # -- what the tools ask (tinybn.nn.norm)
    def batch_moments(self, x):
        return covariance_moments(_channels_first(x))

    def set_statistics(self, pooled):
        """The mean, and the whitening that training mode would compute for one batch with the pooled covariance
        (:func:`tinybn.functional.whitening.whitening_matrix`)."""
        dtype, xp = self.moving_mean.dtype, backend.get_array_module(self.moving_mean.data)
        self.moving_mean.data = xp.asarray(pooled.mean).astype(dtype)
        self.moving_whitening.data = xp.asarray(whitening_matrix(pooled.variance, self.group_size, self.iterations,
                                                                 self.eps)).astype(dtype)

    def reset_running_stats(self):
        xp = backend.get_array_module(self.moving_mean.data)
        self.moving_mean.data = xp.zeros_like(self.moving_mean.data)
        self.moving_whitening.data = xp.eye(self.num_features, dtype=self.moving_whitening.dtype)

    def synchronized(self, comm):
        return twin(self, SyncDecorrelatedBatchNorm, comm=comm)

    def prediction_affine(self):
        """x̂ = W (x − μ), y = γ·x̂ + β: A = diag(γ) W, c = β − A μ."""
        matrix = _host64(self.gamma)[:, None] * backend.to_numpy(self.moving_whitening.data).astype(numpy.float64)
        return matrix, _host64(self.beta) - matrix @ _host64(self.moving_mean)

    def extra_repr(self):
        return (f"{self.num_features}, group_size={self.group_size}, iterations={self.iterations}, "
                f"momentum={self.momentum}, eps={self.eps}")


class SyncDecorrelatedBatchNorm(DecorrelatedBatchNorm):
    """Decorrelated BN over the global batch of a data-parallel job
    (:func:`tinybn.functional.sync_decorrelated_batch_norm`): the mean and covariance of all the ranks' shards
    together, so every rank whitens with the same matrix, the one process would compute on the whole batch.
    ``convert_sync_batchnorm`` makes it from :class:`DecorrelatedBatchNorm`; ``comm`` as for
    :class:`~tinybn.nn.SyncBatchNorm`."""
    synchronizes = True

    def __init__(self, num_features: int, group_size: int = 16, iterations: int = DEFAULT_ITERATIONS,
                 momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS, comm=None, device=None, dtype=numpy.float32):
        super().__init__(num_features, group_size, iterations, momentum, eps, device, dtype)
        object.__setattr__(self, "comm", comm)

    def _normalize(self, x):
        return F.sync_decorrelated_batch_norm(x, self.gamma, self.beta, self.moving_mean, self.moving_whitening,
                                              training=self.training, comm=self.communicator(),
                                              group_size=self.group_size, iterations=self.iterations,
                                              momentum=self.momentum, eps=self.eps)

    def synchronized(self, comm):
        return self if comm is self.comm else twin(self, type(self), comm=comm)
