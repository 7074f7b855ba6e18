r"""Layer normalization: batch norm's standardization, with the statistics taken per example.

For x of shape (N, *S, *D) and ``normalized_shape = D`` (the last len(D) axes), every example — every index
of the leading axes — is standardized over its own D values, so the result does not depend on the batch:
the same in training and prediction, for a batch of one as for a thousand (Ba, Kiros and Hinton, 2016)::

    μ   = mean over D of x                 σ² = mean over D of (x − μ)²        (biased; two passes)
    x̂   = (x − μ) / √(σ² + ε)
    y   = w · x̂ + b                        w, b: shape D (optional, "elementwise affine")

Backward (docs/derivations.md, "Layer and group normalization"): with dx̂ = dy · w and k = the number of
values in D, batch norm's closed form over the D axes instead of the batch::

    dx = (1/√(σ² + ε)) · (dx̂ − mean_D(dx̂) − x̂ · mean_D(dx̂ · x̂))
    dw = Σ over the leading axes of dy · x̂        db = Σ over the leading axes of dy

:func:`standardize` and :func:`standardize_backward` are these steps for any set of axes; group norm
(:mod:`tinybn.functional.groupnorm`) uses them too. There are no moving averages and nothing to switch
between modes.
"""
from __future__ import annotations

import numpy

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module
from .batchnorm import check_floating, compute_dtype, mean_square

DEFAULT_EPS = 1e-5


def standardize(x, axes, eps):
    """``(x̂, inv_std)``: x minus its mean over ``axes``, divided by √(biased variance + eps) (keepdims)."""
    mu = x.mean(axis=axes, keepdims=True)
    x_centered = x - mu
    var = mean_square(x_centered, axes)              # no overflow to inf for float32 beyond |x − μ| ≈ 1.8e19
    inv_std = (1.0 / get_array_module(x).sqrt(var + eps)).astype(x.dtype, copy=False)
    return x_centered * inv_std, inv_std


def standardize_backward(dx_hat, x_hat, inv_std, axes):
    """dx for x̂ = standardize(x): ``inv_std · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))``, means over ``axes``."""
    return inv_std * (dx_hat - dx_hat.mean(axis=axes, keepdims=True)
                      - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True))


def layer_norm_forward(x, weight=None, bias=None, ndim=1, eps=DEFAULT_EPS):
    """``y`` for x (..., *D) with D its last ``ndim`` axes; weight and bias of shape D or None."""
    xp = get_array_module(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)     # float16 statistics in float32, as batch norm
    axes = tuple(range(x.ndim - ndim, x.ndim))
    x_hat, inv_std = standardize(x, axes, eps)
    y = x_hat if weight is None else x_hat * weight
    y = y if bias is None else y + bias
    cache = Cache(x_hat=x_hat, inv_std=inv_std, axes=axes, weight=weight, has_bias=bias is not None,
                  dtypes=(x_dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype))
    return y.astype(x_dtype, copy=False), cache


def layer_norm_backward(dy, cache):
    x_hat, axes = cache.x_hat, cache.axes
    dy = dy.astype(x_hat.dtype, copy=False)
    leading = tuple(range(x_hat.ndim - len(axes)))              # the axes w and b are shared over
    dx_hat = dy if cache.weight is None else dy * cache.weight
    dx = standardize_backward(dx_hat, x_hat, cache.inv_std, axes)
    x_dtype, weight_dtype, bias_dtype = cache.dtypes
    dweight = None if cache.weight is None else (dy * x_hat).sum(axis=leading).astype(weight_dtype, copy=False)
    dbias = dy.sum(axis=leading).astype(bias_dtype, copy=False) if cache.has_bias else None
    return dx.astype(x_dtype, copy=False), dweight, dbias


ops.define("layer_norm", layer_norm_forward, layer_norm_backward)


def normalized_shape_tuple(normalized_shape) -> tuple[int, ...]:
    """PyTorch's ``normalized_shape``: an int or a sequence of ints, each at least 1."""
    whole = (int, numpy.integer)
    try:
        shape = (normalized_shape,) if isinstance(normalized_shape, whole) else tuple(normalized_shape)
    except TypeError:
        shape = ()
    if not shape or not all(isinstance(n, whole) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise ValueError(f"layer_norm: normalized_shape must be a positive whole number or a non-empty sequence of "
                         f"them, got {normalized_shape!r}")
    return tuple(int(n) for n in shape)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=DEFAULT_EPS):
    """Layer normalization over the last axes of ``x``, which must equal ``normalized_shape``; PyTorch's
    ``F.layer_norm(input, normalized_shape, weight, bias, eps)``. See the module docstring."""
    shape = normalized_shape_tuple(normalized_shape)
    check_floating("layer_norm", x)
    if tuple(x.shape[len(x.shape) - len(shape):]) != shape or len(x.shape) < len(shape):
        raise ValueError(f"layer_norm: the last axes of an input of shape {tuple(x.shape)} must be normalized_shape "
                         f"{shape}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"layer_norm: {name} has shape {tuple(value.shape)}, normalized_shape is {shape}")
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be positive, got {eps}: a constant example would divide by zero")
    return apply("layer_norm", x, weight, bias, ndim=len(shape), eps=eps)
