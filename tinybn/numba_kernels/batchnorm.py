"""Batch norm over batch-last memory: :mod:`tinybn.functional.batchnorm`'s forward and closed-form backward.

Read the reference first for the mathematics (docs/derivations.md, "Batch normalization"). In batch-last memory
each channel's m values (N for (N, C) input, H·W·N for (N, C, H, W)) are one contiguous row, so every statistic
is a plain row reduction, and the threads take rows::

    forward   μ = mean(x)            σ² = mean((x − μ)²)          two passes, summed in float64
              y = γ · (x − μ) · 1/√(σ² + ε) + β                   a third pass, in x's dtype
    backward  dβ = Σ dy,  dγ = Σ dy · x̂                          one pass (x̂ recomputed from x, μ, 1/√(σ² + ε))
              dx = γ/√(σ² + ε) · (dy − dβ/m − x̂ · dγ/m)           one more (prediction mode: dx = dy · γ/√(σ² + ε))

The cache keeps x (the graph keeps it alive anyway) instead of x̂, which the backward recomputes. Summing in
float64 also keeps σ² right where float32 squares would overflow (|x − μ| beyond about 1.8e19), as the reference
does by computing again in float64 there.
"""
from __future__ import annotations

import math

import numba
import numpy

from .. import ops
from ..autograd import Cache
from ._common import PARALLEL, batch_first, batch_last, floats, run_on_threads


@numba.njit(**PARALLEL)
def _statistics(rows, mean, var):
    """μ and the biased σ² of each row, two passes in float64."""
    channels, m = rows.shape
    for c in numba.prange(channels):
        total = 0.0
        for k in range(m):
            total += rows[c, k]
        mu = total / m
        squares = 0.0
        for k in range(m):
            d = rows[c, k] - mu
            squares += d * d
        mean[c], var[c] = mu, squares / m


@numba.njit(**PARALLEL)
def _normalize(rows, mean, inv_std, gamma, beta, y):
    """y = γ · ((x − μ) · inv_std) + β, row by row, in x's dtype (the reference's order of operations)."""
    channels, m = rows.shape
    for c in numba.prange(channels):
        mu, s, g, b = mean[c], inv_std[c], gamma[c], beta[c]
        for k in range(m):
            y[c, k] = g * ((rows[c, k] - mu) * s) + b


@numba.njit(**PARALLEL)
def _backward(rows, dy, mean, inv_std, gamma, training, dx, dgamma, dbeta):
    """dβ, dγ in one pass over each row, then dx in a second (its closed form needs both sums)."""
    channels, m = rows.shape
    for c in numba.prange(channels):
        mu, s = mean[c], inv_std[c]
        sum_dy, sum_dy_xhat = 0.0, 0.0
        for k in range(m):
            g = dy[c, k]
            sum_dy += g
            sum_dy_xhat += g * ((rows[c, k] - mu) * s)
        dbeta[c], dgamma[c] = sum_dy, sum_dy_xhat
        scale = gamma[c] * s
        if training:
            mean_dy, mean_dy_xhat = sum_dy / m, sum_dy_xhat / m
            for k in range(m):
                dx[c, k] = scale * (dy[c, k] - mean_dy - ((rows[c, k] - mu) * s) * mean_dy_xhat)
        else:
            for k in range(m):
                dx[c, k] = dy[c, k] * scale


def batch_norm_forward(x, gamma, beta, moving_mean, moving_var, training, eps):
    """:func:`tinybn.functional.batchnorm.batch_norm_forward`; y comes back batch-last."""
    channels = x.shape[1]
    x_last = batch_last(x)                         # (C, H, W, N) or (C, N): each channel a contiguous row
    rows = x_last.reshape(channels, -1)
    dtype = x.dtype
    run_on_threads()
    if training:
        mean64, var64 = numpy.empty(channels), numpy.empty(channels)
        _statistics(rows, mean64, var64)
    else:
        mean64, var64 = moving_mean.reshape(-1).astype(numpy.float64), moving_var.reshape(-1).astype(numpy.float64)
    inv_std = (1.0 / numpy.sqrt(var64 + eps)).astype(dtype)
    mean = mean64.astype(dtype)
    y = numpy.empty_like(rows)
    _normalize(rows, mean, inv_std, gamma.reshape(-1), beta.reshape(-1), y)
    cache = Cache(rows=rows, mean=mean, inv_std=inv_std, gamma=gamma.reshape(-1), training=training,
                  x_last_shape=x_last.shape, gamma_shape=gamma.shape, beta_shape=beta.shape)
    return (batch_first(y.reshape(x_last.shape)), mean, var64.astype(dtype)), cache


def batch_norm_backward(dy, cache):
    """:func:`tinybn.functional.batchnorm.batch_norm_backward` (the closed form)."""
    channels = cache.rows.shape[0]
    dy_rows = batch_last(dy).reshape(channels, -1)
    dx = numpy.empty_like(cache.rows)
    dgamma, dbeta = numpy.empty(channels), numpy.empty(channels)
    run_on_threads()
    _backward(cache.rows, dy_rows, cache.mean, cache.inv_std, cache.gamma, cache.training, dx, dgamma, dbeta)
    dtype = cache.rows.dtype
    return (batch_first(dx.reshape(cache.x_last_shape)), dgamma.astype(dtype).reshape(cache.gamma_shape),
            dbeta.astype(dtype).reshape(cache.beta_shape), None, None)


def _applies(x, gamma, beta, moving_mean, moving_var, training, eps):
    return floats(x, gamma, beta, moving_mean, moving_var) and x.ndim in (2, 4) and math.isfinite(eps)


ops.register_kernel("batch_norm", "numba", batch_norm_forward, batch_norm_backward, applies=_applies)
