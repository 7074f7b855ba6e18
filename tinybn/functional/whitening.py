r"""Decorrelated batch normalization by iterative whitening (IterNorm: Huang, Zhou, Zhu, Liu and Shao, 2019).

Batch norm standardizes each channel by itself, so correlated channels stay correlated. The chapter's
exercise 7 asks about a full-rank covariance estimate: whiten the channels, so that the output's covariance
over the batch is the identity. Whitening C channels costs C² numbers per matrix, so they are whitened in
groups of ``group_size`` consecutive channels (the last group may be smaller).

For one group of g channels, with X (g, m) its m values per channel in the batch::

    μ   = mean of X over the m values                          (g, 1)
    Xc  = X − μ
    Σ   = Xc Xcᵀ / m + ε I                                      (g, g) covariance, biased, regularized
    S   = Σ / tr(Σ)                                             eigenvalues now in (0, 1]
    Y₀  = S,  Z₀ = I                                            coupled Newton–Schulz, k = 0 … T − 1:
    T_k = ½ (3 I − Z_k Y_k),  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k        Y_k → S^(1/2), Z_k → S^(−1/2)
    W   = Z_T / √tr(Σ)                                          ≈ Σ^(−1/2)
    x̂   = W Xc,      y = γ · x̂ + β                              γ, β per channel

Why Newton–Schulz rather than an eigendecomposition (ZCA, W = U Λ^(−1/2) Uᵀ): the backward through an
eigendecomposition has terms 1/(λ_i − λ_j), which blow up when two eigenvalues are close — common in a
covariance of many channels. Matrix products have no such terms, and run well on a GPU. Dividing by the
trace makes the iteration converge. With a fixed T it whitens the directions of large variance fully and
stretches those of small variance only part of the way, which keeps the noise of a small batch from being
amplified (docs/derivations.md, "Decorrelated batch normalization", derives it and the backward).

IterNorm's paper writes the iteration uncoupled, P_k = ½ (3 P_{k−1} − P_{k−1}³ S), which is the same sequence
in exact arithmetic (Z_k = P_k) at the same cost, three matrix products per step. tinybn uses the coupled form
because the uncoupled one is numerically unstable: on a covariance with condition number 10⁴ its rounding
errors overflowed to NaN after 15 steps, while the coupled one converged to the exact whitening in 20 steps
and stayed there at 100 (tests/test_normalization.py).

Prediction mode uses moving averages of μ and of W (``moving_whitening``: all the groups' W in one
block-diagonal (C, C) matrix), updated with batch norm's convention, so x̂ = W_moving (x − μ_moving).
Precise statistics replace them by the mean of many training batches together and the W of their
covariance (:func:`whitening_matrix`), as precise BN does for the mean and variance.

Backward, for one group (dx̂ = γ · dy; every step is a matrix product, undone with its transposes)::

    dW  = dx̂ Xcᵀ,  dXc = Wᵀ dx̂
    dZ_T = dW / √tr,  dtr = −½ tr^(−3/2) Σ (dW ⊙ Z_T),  dY_T = 0
    for k = T − 1 … 0:
        dT_k = Y_kᵀ dY_{k+1} + dZ_{k+1} Z_kᵀ
        dY_k = dY_{k+1} T_kᵀ − ½ Z_kᵀ dT_k
        dZ_k = T_kᵀ dZ_{k+1} − ½ dT_k Y_kᵀ
    dS  = dY₀  (Z₀ = I is a constant)
    dΣ  = dS / tr,  dtr −= Σ (dS ⊙ Σ) / tr²,  dΣ += dtr · I
    dXc += (dΣ + dΣᵀ) Xc / m
    dX  = dXc − mean of dXc over the m values
    dγ  = Σ dy · x̂,  dβ = Σ dy
"""
from __future__ import annotations

import numpy

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module
from .batchnorm import (DEFAULT_EPS, DEFAULT_MOMENTUM, BatchTooSmallError, check_floating, check_momentum,
                        compute_dtype, new_moving_averages)

DEFAULT_ITERATIONS = 5


def groups(channels: int, group_size: int) -> list[tuple[int, int]]:
    """``(first, last + 1)`` of each group of ``group_size`` consecutive channels (the last may be smaller)."""
    return [(start, min(start + group_size, channels)) for start in range(0, channels, group_size)]


def _channels_first(x):
    """x (N, C) or (N, C, H, W) as X (C, m), m values per channel."""
    return x.T if x.ndim == 2 else x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)


def _back_to_input_shape(X, shape):
    if len(shape) == 2:
        return X.T
    n, c, h, w = shape
    return X.reshape(c, n, h, w).transpose(1, 0, 2, 3)


def newton_schulz(sigma, iterations):
    """``(W, entries)``: W ≈ Σ^(−1/2) for a regularized covariance Σ (g, g) by ``iterations`` coupled
    Newton–Schulz steps, and the iterates the backward needs (the forward above, from S = Σ / tr(Σ))."""
    xp = get_array_module(sigma)
    trace = xp.trace(sigma)
    identity = xp.eye(sigma.shape[0], dtype=sigma.dtype)
    Y, Z, T = [sigma / trace], [identity], []
    for _ in range(iterations):
        T.append(1.5 * identity - 0.5 * (Z[-1] @ Y[-1]))
        Y.append(Y[-1] @ T[-1])
        Z.append(T[-1] @ Z[-1])
    W = Z[-1] / xp.sqrt(trace)
    return W, dict(sigma=sigma, trace=trace, Y=Y, Z=Z, T=T, W=W)


def covariance(Xc):
    """Xc Xcᵀ / m for centered values Xc (g, m). Where the products overflow (float32 beyond |x − μ| ≈ 1.8e19) they
    are taken again in float64 and the matrix comes back in float64, as batch norm's variance does."""
    xp = get_array_module(Xc)
    sigma = Xc @ Xc.T / Xc.shape[1]
    if Xc.dtype.itemsize < 8 and not bool(xp.isfinite(sigma).all()):
        wide = Xc.astype(xp.float64)
        sigma = wide @ wide.T / Xc.shape[1]
    return sigma


def whiten_group(X, eps, iterations):
    """``(x̂, μ, W, cache entries)`` for one group's X (g, m): the forward above."""
    xp = get_array_module(X)
    g, m = X.shape
    mu = X.mean(axis=1, keepdims=True)
    Xc = X - mu
    sigma = covariance(Xc)
    W, entries = newton_schulz(sigma + eps * xp.eye(g, dtype=sigma.dtype), iterations)
    if W.dtype != X.dtype:     # an overflowing float32 covariance, whitened in float64: W fits X's dtype again (the
        W = entries["W"] = W.astype(X.dtype)           # backward keeps the iterates in float64)
    return W @ Xc, mu, W, dict(entries, Xc=Xc)


def whitening_matrix(covariance, group_size, iterations=DEFAULT_ITERATIONS, eps=DEFAULT_EPS):
    """The block-diagonal whitening matrix (C, C) that training mode computes for a batch whose biased
    covariance over the values of each channel is ``covariance`` (C, C; only its diagonal blocks are used).

    Precise statistics for decorrelated BN (:func:`tinybn.nn.recompute_batch_norm_statistics`) are this
    matrix for the covariance of many batches together: the whitening of one batch holding them all, as
    precise BN's variance is that batch's variance."""
    for name, value in (("group_size", group_size), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
            raise ValueError(f"whitening_matrix: {name} must be a whole number of at least 1, got {value!r}")
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"whitening_matrix: the covariance must be a square (C, C) matrix, got shape "
                         f"{tuple(covariance.shape)}")
    if not eps > 0:
        raise ValueError(f"whitening_matrix: eps must be positive, got {eps}")
    xp = get_array_module(covariance)
    channels = covariance.shape[0]
    W = xp.zeros((channels, channels), covariance.dtype)
    for first, last in groups(channels, group_size):
        sigma = covariance[first:last, first:last] + eps * xp.eye(last - first, dtype=covariance.dtype)
        W[first:last, first:last] = newton_schulz(sigma, iterations)[0]
    return W


def newton_schulz_backward(dW, saved):
    """dΣ from dW = dL/dW, through W = Z_T / √tr(Σ) and the Newton–Schulz steps back to Σ (the backward above,
    from its second line to dΣ += dtr · I)."""
    xp = get_array_module(dW)
    sigma, trace, Y, Z, T = (saved[k] for k in ("sigma", "trace", "Y", "Z", "T"))
    dZ = dW / xp.sqrt(trace)
    dtrace = -0.5 * trace ** -1.5 * (dW * Z[-1]).sum()
    dY = xp.zeros_like(dZ)
    for k in range(len(T) - 1, -1, -1):
        dT = Y[k].T @ dY + dZ @ Z[k].T
        dY, dZ = dY @ T[k].T - 0.5 * (Z[k].T @ dT), T[k].T @ dZ - 0.5 * (dT @ Y[k].T)
    dS = dY
    dsigma = dS / trace
    dtrace = dtrace - (dS * sigma).sum() / trace ** 2
    return dsigma + dtrace * xp.eye(sigma.shape[0], dtype=sigma.dtype)


def whiten_group_backward(dx_hat, saved):
    """dX for one group, from dx̂ (g, m): the backward above."""
    Xc, W = saved["Xc"], saved["W"]
    m = Xc.shape[1]
    dsigma = newton_schulz_backward(dx_hat @ Xc.T, saved)      # dW = dx̂ Xcᵀ
    dXc = W.T @ dx_hat + (dsigma + dsigma.T) @ Xc / m
    return dXc - dXc.mean(axis=1, keepdims=True)


def decorrelated_batch_norm_forward(x, gamma, beta, moving_mean, moving_whitening, training, group_size=16,
                                    iterations=DEFAULT_ITERATIONS, eps=DEFAULT_EPS):
    """``((y, μ (C,), W (C, C) block-diagonal), cache)``; in prediction mode μ and W are the moving ones."""
    xp = get_array_module(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    X = _channels_first(x)
    channels = X.shape[0]
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    saved = []
    if training:
        x_hat_rows, mu, W = [], xp.zeros((channels, 1), X.dtype), xp.zeros((channels, channels), X.dtype)
        for first, last in groups(channels, group_size):
            x_hat_group, mu[first:last], W[first:last, first:last], entries = whiten_group(X[first:last], eps,
                                                                                           iterations)
            x_hat_rows.append(x_hat_group)
            saved.append(entries)
        X_hat = xp.concatenate(x_hat_rows, axis=0)
    else:
        mu, W = moving_mean.reshape(channels, 1).astype(X.dtype), moving_whitening.astype(X.dtype)
        X_hat = W @ (X - mu)
    x_hat = _back_to_input_shape(X_hat, x.shape)
    g = gamma.reshape(per_channel)
    y = (g * x_hat + beta.reshape(per_channel)).astype(x_dtype, copy=False)
    cache = Cache(x_hat=x_hat, saved=saved, W=W, gamma=g, group_size=group_size, training=training,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu.reshape(-1), W), cache


def decorrelated_batch_norm_backward(dy, cache):
    xp = get_array_module(dy)
    x_hat = cache.x_hat
    dy = dy.astype(x_hat.dtype, copy=False)
    shared = (0,) + tuple(range(2, dy.ndim))
    dgamma = (dy * x_hat).sum(axis=shared)
    dbeta = dy.sum(axis=shared)
    dX_hat = _channels_first(dy * cache.gamma)
    if cache.training:
        rows = [whiten_group_backward(dX_hat[first:last], saved)
                for (first, last), saved in zip(groups(dX_hat.shape[0], cache.group_size), cache.saved)]
        dX = xp.concatenate(rows, axis=0)
    else:
        dX = cache.W.T @ dX_hat
    x_dtype, gamma_dtype, beta_dtype = cache.dtypes
    return (_back_to_input_shape(dX, dy.shape).astype(x_dtype, copy=False),
            dgamma.reshape(cache.gamma_shape).astype(gamma_dtype, copy=False),
            dbeta.reshape(cache.beta_shape).astype(beta_dtype, copy=False), None, None)


ops.define("decorrelated_batch_norm", decorrelated_batch_norm_forward, decorrelated_batch_norm_backward)


def check_whitening_arguments(x, gamma, beta, moving_mean, moving_whitening, group_size, iterations, eps,
                              training: bool) -> None:
    """Every check decorrelated BN makes, for every implementation (``training``: also more than one value per
    channel, which synchronized decorrelated BN checks over all the ranks' shards instead)."""
    if len(x.shape) not in (2, 4):
        raise ValueError(f"decorrelated_batch_norm expects a 2-D (N, C) or 4-D (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}")
    channels = x.shape[1]
    for name, value, shape in (("gamma", gamma, (channels,)), ("beta", beta, (channels,)),
                               ("moving_mean", moving_mean, (channels,)),
                               ("moving_whitening", moving_whitening, (channels, channels))):
        if tuple(value.shape) != shape:
            raise ValueError(f"decorrelated_batch_norm: {name} has shape {tuple(value.shape)}, expected {shape} for "
                             f"an input of shape {tuple(x.shape)}")
    check_floating("decorrelated_batch_norm", x)
    for name, value in (("group_size", group_size), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
            raise ValueError(f"decorrelated_batch_norm: {name} must be a whole number of at least 1, got {value!r}")
    if training and x.size and x.size == channels:
        raise BatchTooSmallError(f"decorrelated_batch_norm in training mode needs more than one value per channel, "
                                 f"got an input of shape {tuple(x.shape)}.")
    if not eps > 0:
        raise ValueError(f"decorrelated_batch_norm: eps must be positive, got {eps}")


def decorrelated_batch_norm(x, gamma, beta, moving_mean, moving_whitening, *, training, group_size=16,
                            iterations=DEFAULT_ITERATIONS, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS):
    """Whiten x (N, C) or (N, C, H, W) in groups of ``group_size`` channels; returns ``(y, new_moving_mean,
    new_moving_whitening)``: γ, β and moving_mean (C,), moving_whitening (C, C). See the module docstring."""
    check_whitening_arguments(x, gamma, beta, moving_mean, moving_whitening, group_size, iterations, eps, training)
    if training:
        check_momentum("decorrelated_batch_norm", momentum)
    training = training and x.size > 0
    y, mu, W = apply("decorrelated_batch_norm", x, gamma, beta, moving_mean, moving_whitening, training=training,
                     group_size=int(group_size), iterations=int(iterations), eps=eps)
    return (y, *new_moving_averages((moving_mean, mu), (moving_whitening, W), momentum=momentum, update=training))
