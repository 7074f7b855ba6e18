r"""Group normalization (Wu and He, 2018), and instance normalization as its case G = C.

For x of shape (N, C, *spatial), the C channels are cut into G groups of C/G consecutive channels, and
every (example, group) pair is standardized over its C/G · |spatial| values — per example, so the batch
size does not matter — then scaled and shifted per channel::

    x̂[n, g] = standardize(x[n, channels of g, ...])        (mean and biased variance over those values)
    y[n, c] = w[c] · x̂[n, c] + b[c]

G = 1 standardizes each example over all its values (layer norm over (C, H, W) with per-channel w, b);
G = C standardizes each channel of each example by itself: instance normalization.

Backward (docs/derivations.md, "Layer and group normalization"): dx̂ = dy · w, then layer norm's closed form
inside each group (:func:`tinybn.functional.layernorm.standardize_backward`)::

    dx = inv_std · (dx̂ − mean_group(dx̂) − x̂ · mean_group(dx̂ · x̂))
    dw[c] = Σ_{n, spatial} dy · x̂        db[c] = Σ_{n, spatial} dy
"""
from __future__ import annotations

import numpy

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module
from .batchnorm import check_floating, compute_dtype
from .layernorm import DEFAULT_EPS, standardize, standardize_backward


def _per_channel(value, x):
    return value.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))


def group_norm_forward(x, weight=None, bias=None, num_groups=1, eps=DEFAULT_EPS):
    xp = get_array_module(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    n = x.shape[0]
    grouped = x.reshape(n, num_groups, -1)                   # (N, G, C/G · spatial)
    x_hat_grouped, inv_std = standardize(grouped, (2,), eps)
    x_hat = x_hat_grouped.reshape(x.shape)
    y = x_hat if weight is None else x_hat * _per_channel(weight, x)
    y = y if bias is None else y + _per_channel(bias, x)
    cache = Cache(x_hat=x_hat, inv_std=inv_std, num_groups=num_groups, weight=weight, has_bias=bias is not None,
                  dtypes=(x_dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype))
    return y.astype(x_dtype, copy=False), cache


def group_norm_backward(dy, cache):
    x_hat = cache.x_hat
    dy = dy.astype(x_hat.dtype, copy=False)
    n = x_hat.shape[0]
    shared = (0,) + tuple(range(2, x_hat.ndim))               # w and b are shared over examples and positions
    dx_hat = dy if cache.weight is None else dy * _per_channel(cache.weight, x_hat)
    dx = standardize_backward(dx_hat.reshape(n, cache.num_groups, -1), x_hat.reshape(n, cache.num_groups, -1),
                              cache.inv_std, (2,)).reshape(x_hat.shape)
    x_dtype, weight_dtype, bias_dtype = cache.dtypes
    dweight = None if cache.weight is None else (dy * x_hat).sum(axis=shared).astype(weight_dtype, copy=False)
    dbias = dy.sum(axis=shared).astype(bias_dtype, copy=False) if cache.has_bias else None
    return dx.astype(x_dtype, copy=False), dweight, dbias


ops.define("group_norm", group_norm_forward, group_norm_backward)


def group_norm(x, num_groups, weight=None, bias=None, eps=DEFAULT_EPS):
    """Group normalization of x (N, C, *) in ``num_groups`` groups of channels, with optional per-channel
    ``weight`` and ``bias`` (C,); PyTorch's ``F.group_norm(input, num_groups, weight, bias, eps)``."""
    if len(x.shape) < 2:
        raise ValueError(f"group_norm expects an input of shape (N, C, ...), got shape {tuple(x.shape)}")
    check_floating("group_norm", x)
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, numpy.integer)) or num_groups < 1 \
            or channels % num_groups:
        raise ValueError(f"group_norm: num_groups must be a whole number of at least 1 that divides the {channels} "
                         f"channels, got {num_groups!r}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and tuple(value.shape) != (channels,):
            raise ValueError(f"group_norm: {name} has shape {tuple(value.shape)}, expected ({channels},)")
    if not eps > 0:
        raise ValueError(f"group_norm: eps must be positive, got {eps}: a constant group would divide by zero")
    if x.shape[0] == 0:
        return x * 1.0
    return apply("group_norm", x, weight, bias, num_groups=int(num_groups), eps=eps)


def instance_statistics(x):
    """Per channel (C,): the mean over the batch of each example's mean and of each example's biased variance
    over its positions — what an instance-norm layer that tracks running statistics averages (no gradient)."""
    xp = get_array_module(x)
    x = x.astype(compute_dtype(xp, x.dtype), copy=False)
    axes = tuple(range(2, x.ndim))
    return x.mean(axis=axes).mean(axis=0), x.var(axis=axes).mean(axis=0)
