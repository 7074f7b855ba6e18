r"""Synchronized batch normalization: one batch, split across the ranks of a data-parallel job.

Each rank r holds a shard x_r of the global batch: m_r values per channel, M = Σ_r m_r in all (shards
may differ in size, and one may be empty). Plain batch norm on each rank would normalize with the
shard's statistics; synchronized batch norm normalizes every shard with the statistics of the whole
batch, so P ranks compute what one process computes on the concatenated batch. Shapes and the
moving-average convention are batch norm's (:mod:`tinybn.functional.batchnorm`).

Forward (training mode)
-----------------------
::

    on each rank:  μ_r  = (1/m_r) Σ x_r        M2_r = Σ (x_r − μ_r)²       (two passes; 0 and 0 for an empty shard)
    all_gather:    (C, m_r, μ_r, M2_r) of every rank: 2C + 2 numbers per rank (float64), one collective
    on each rank:  M    = Σ_r m_r
                   μ    = Σ_r m_r μ_r / M
                   σ²   = (Σ_r M2_r + Σ_r m_r (μ_r − μ)²) / M                (Chan et al.'s parallel update)
                   x̂_r  = (x_r − μ) / √(σ² + ε)        y_r = γ · x̂_r + β

The combination keeps the two-pass accuracy (no E[x²] − E[x]², which loses the variance when |μ| ≫ σ:
see batch norm's "Why two passes"), and every rank computes it from the same gathered numbers in the
same order, so μ, σ² and the moving averages are bit-for-bit the same on every rank.

Backward
--------
Batch norm's closed form, with its two per-channel sums taken over the whole batch::

    on each rank:  dβ_r = Σ dy_r           dγ_r = Σ dy_r · x̂_r
    all_reduce:    dβ = Σ_r dβ_r,  dγ = Σ_r dγ_r: 2C numbers (float64), one collective
    on each rank:  dx_r = (γ / √(σ² + ε)) · (dy_r − dβ/M − x̂_r · dγ/M)

The gradients returned for γ and β are this rank's dγ_r and dβ_r: the data-parallel step sums every
parameter's gradient over the ranks once, for all parameters together
(:func:`tinybn.distributed.all_reduce_gradients`); summing them here too would count them P times.
Derivation: docs/derivations.md, "Synchronized batch normalization".

Every rank must call the forward and the backward (both are collectives), in training mode, even
with an empty shard. Prediction mode uses the moving averages, which are the same on every rank, and
communicates nothing: it is :func:`tinybn.functional.batch_norm`.

The same two exchanges synchronize the other normalizations that use the whole batch's statistics
(docs/derivations.md, "Synchronized batch renorm and decorrelated BN"):

* batch renorm (:func:`sync_batch_renorm`): r and d come from the global μ and σ², and its backward is batch
  norm's closed form for z = (x − μ)/σ with dz = r·γ·dy, so the all_reduce sums Σdz and Σdz·z instead;
* decorrelated BN (:func:`sync_decorrelated_batch_norm`): the all_gather carries each rank's (C, C) sum of
  outer products, pooled into the global covariance Σ; the backward sums dW = Σ dx̂ Xcᵀ over the ranks (every
  rank then backpropagates through the Newton–Schulz steps alike) and, once more, the per-channel sums of dXc.

The pooling of the ranks' moments is :func:`tinybn.functional.moments.pool`, the one formula every tool uses.
"""
from __future__ import annotations

import numpy

from .. import backend, ops
from ..autograd import Cache, Tensor, apply
from ..backend import get_array_module
from .batchnorm import (DEFAULT_EPS, DEFAULT_MOMENTUM, BatchTooSmallError, _in_input_dtypes, _per_channel, batch_norm, check_arguments,
                        check_momentum, compute_dtype, mean_square, new_moving_averages, reduction_axes)
from .batchrenorm import batch_renorm
from .moments import Moments, pool
from .whitening import (DEFAULT_ITERATIONS, _back_to_input_shape, _channels_first, check_whitening_arguments,
                        decorrelated_batch_norm, groups, newton_schulz, newton_schulz_backward)


def _check_channels(comm, channels: int, xp) -> None:
    """Gathers of different sizes are an MPI error that ends some ranks and not others: first make sure every
    rank has the same number of channels, so that all of them get this error instead."""
    others = comm.all_gather(xp.asarray([channels], numpy.float64)).reshape(-1)
    if bool((others != channels).any()):
        raise ValueError(f"sync_batch_norm: the ranks disagree on the number of channels "
                         f"({', '.join(str(int(c)) for c in backend.to_numpy(others))} on ranks 0 to "
                         f"{len(others) - 1}); every rank must run the same layer")


def global_moments(x, comm, check_channels: bool) -> Moments:
    """The moments per channel of the global batch, of which ``x`` (N, C[, H, W]) is this rank's shard: each rank's
    count, mean and M2 (two passes, in x's dtype) gathered in one collective, then pooled in float64
    (:func:`tinybn.functional.moments.pool`). The same numbers on every rank. C goes first in the message, so
    that ranks that disagree on it are caught: MPI fails on the rank with fewer channels, this check on the
    others."""
    xp = get_array_module(x)
    axes, channels = reduction_axes(x), x.shape[1]
    m = x.size // channels if channels else 0
    if check_channels:
        _check_channels(comm, channels, xp)
    if m:
        mu_r = x.mean(axis=axes)
        x_centered = x - _per_channel(mu_r, x)
        m2_r = mean_square(x_centered, axes).reshape(-1) * m
    else:
        mu_r = m2_r = xp.zeros(channels, x.dtype)
    local = xp.concatenate([xp.asarray([channels, m], numpy.float64), mu_r.astype(numpy.float64),
                            m2_r.astype(numpy.float64)])
    gathered = comm.all_gather(local)                       # (P, 2C + 2)
    if bool((gathered[:, 0] != channels).any()):
        raise ValueError(f"sync_batch_norm: the ranks disagree on the number of channels (this rank, "
                         f"{comm.rank}, has {channels}); every rank must run the same layer")
    parts = [Moments(int(row[1]), row[2:channels + 2], row[channels + 2:]) for row in gathered]
    total = sum(part.count for part in parts)
    if total == 1:
        raise BatchTooSmallError(f"sync_batch_norm in training mode needs more than one value per channel over all "
                                 f"the ranks' shards, but they hold exactly one (this rank's shard has shape "
                                 f"{tuple(x.shape)}): every normalized value would be 0.")
    return pool(parts) if total else Moments(0, None, None)


def _global_sums(comm, *sums):
    """Per-channel sums of this rank's shard, summed over the ranks in one all_reduce (float64: one dtype on
    every rank), each back in its own dtype."""
    xp = get_array_module(sums[0])
    flat = xp.concatenate([s.reshape(-1) for s in sums]).astype(numpy.float64)
    total = comm.all_reduce(flat)
    out, start = [], 0
    for s in sums:
        out.append(total[start:start + s.size].reshape(s.shape).astype(s.dtype))
        start += s.size
    return out


def sync_batch_norm_forward(x, gamma, beta, moving_mean, moving_var, eps=DEFAULT_EPS, comm=None, check_channels=True):
    """Training-mode forward over the ranks of ``comm``; returns ``((y, μ, σ², M), cache)``: μ and σ² per channel
    (C,) over the global batch, M the global number of values per channel (a 0-d array). With no value on any
    rank (M = 0) the moving averages normalize, as for an empty batch in plain batch norm."""
    xp = get_array_module(x)
    axes = reduction_axes(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    pooled = global_moments(x, comm, check_channels)
    if pooled.count == 0:
        mu, var = moving_mean.reshape(-1).astype(x.dtype), moving_var.reshape(-1).astype(x.dtype)
    else:
        mu, var = pooled.mean.astype(x.dtype), pooled.variance.astype(x.dtype)
    inv_std = (1.0 / xp.sqrt(_per_channel(pooled.variance if pooled.count else var, x) + eps)).astype(x.dtype)
    x_hat = (x - _per_channel(mu, x)) * inv_std
    g, b = _per_channel(gamma, x), _per_channel(beta, x)
    y = (g * x_hat + b).astype(x_dtype, copy=False)
    cache = Cache(x_hat=x_hat, inv_std=inv_std, gamma=g, axes=axes, M=pooled.count, comm=comm,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu, var, xp.asarray(pooled.count)), cache


def sync_batch_norm_backward(dy, cache):
    """``(dx, dgamma_r, dbeta_r, None, None)``; one all_reduce of Σdy and Σdy·x̂ per call, on every rank."""
    axes, x_hat = cache.axes, cache.x_hat
    dy = dy.astype(x_hat.dtype, copy=False)
    dbeta_r = dy.sum(axis=axes, keepdims=True)               # this rank's share: the parameters' gradients
    dgamma_r = (dy * x_hat).sum(axis=axes, keepdims=True)
    dbeta, dgamma = _global_sums(cache.comm, dbeta_r, dgamma_r)
    M = max(cache.M, 1)                                       # M = 0: nothing to send back, and no 0/0
    dx = (cache.gamma * cache.inv_std) * (dy - dbeta / M - x_hat * (dgamma / M))
    return _in_input_dtypes(dx, dgamma_r, dbeta_r, cache)


ops.define("sync_batch_norm", sync_batch_norm_forward, sync_batch_norm_backward)


def _local_count(x, training: bool) -> int:
    data = x.data if isinstance(x, Tensor) else x
    return data.size // data.shape[1] if training and data.ndim > 1 and data.shape[1] else 0


def sync_batch_norm(x, gamma, beta, moving_mean, moving_var, *, training, comm, momentum=DEFAULT_MOMENTUM,
                    eps=DEFAULT_EPS, check_channels=True):
    """Batch-normalize this rank's shard ``x`` with the statistics of the global batch; returns
    ``(y, new_moving_mean, new_moving_var, M)``, M the number of values per channel in the global batch.

    The arguments and results are :func:`~tinybn.functional.batch_norm`'s, plus M: a rank cannot tell from
    its own shard whether the batch held any value (an empty global batch leaves the moving averages as they
    are, and a layer should not count it). ``comm`` is a :class:`tinybn.communicator.Communicator`; the layer
    (:class:`tinybn.nn.SyncBatchNorm`) supplies it. With one rank, or in prediction mode, this is plain batch
    norm and communicates nothing.

    ``check_channels`` first makes sure every rank has the same number of channels, with one more small
    collective: ranks that disagree then all get this error, instead of MPI's "message truncated" on some and
    nothing on others. :class:`tinybn.nn.SyncBatchNorm` checks on its first training call only.
    """
    if not training or comm.world_size == 1:
        y, new_mean, new_var = batch_norm(x, gamma, beta, moving_mean, moving_var, training=training,
                                          momentum=momentum, eps=eps)
        return y, new_mean, new_var, _local_count(x, training)
    # the single value per channel that plain batch norm refuses is checked over all the shards, in the forward
    check_arguments(x, (gamma, beta, moving_mean, moving_var), training, eps, whole_batch=False)
    check_momentum("sync_batch_norm", momentum)
    y, mu, var, count = apply("sync_batch_norm", x, gamma, beta, moving_mean, moving_var, eps=eps, comm=comm,
                              check_channels=check_channels)
    count = int(count.data)
    return (y, *new_moving_averages((moving_mean, mu), (moving_var, var), momentum=momentum, update=count > 0), count)


# ---------------------------------------------------------------------------------------------- batch renorm


def sync_batch_renorm_forward(x, gamma, beta, moving_mean, moving_var, r_max=3.0, d_max=5.0, eps=DEFAULT_EPS,
                              comm=None, check_channels=True):
    """Batch renorm's training forward (:mod:`tinybn.functional.batchrenorm`) with μ_B and σ_B of the global batch;
    returns ``((y, μ_B, σ²_B, M), cache)``."""
    xp = get_array_module(x)
    axes = reduction_axes(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    pooled = global_moments(x, comm, check_channels)
    mean, sigma = _per_channel(moving_mean, x), xp.sqrt(_per_channel(moving_var, x) + eps)
    if pooled.count == 0:           # no value anywhere: prediction mode's normalization, nothing to count
        mu, var = moving_mean.reshape(-1).astype(x.dtype), moving_var.reshape(-1).astype(x.dtype)
    else:
        mu, var = pooled.mean.astype(x.dtype), pooled.variance.astype(x.dtype)
    sigma_batch = xp.sqrt(_per_channel(var, x) + eps)
    r = xp.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
    d = xp.clip((_per_channel(mu, x) - mean) / sigma, -d_max, d_max)
    z = (x - _per_channel(mu, x)) / sigma_batch
    x_hat = z * r + d
    g, b = _per_channel(gamma, x), _per_channel(beta, x)
    y = (g * x_hat + b).astype(x_dtype, copy=False)
    cache = Cache(z=z, x_hat=x_hat, r=r, inv_std=1.0 / sigma_batch, gamma=g, axes=axes, M=pooled.count, comm=comm,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu, var, xp.asarray(pooled.count)), cache


def sync_batch_renorm_backward(dy, cache):
    """Batch renorm's backward with its two per-channel means taken over the global batch (one all_reduce)."""
    axes, z = cache.axes, cache.z
    dy = dy.astype(z.dtype, copy=False)
    dbeta_r = dy.sum(axis=axes, keepdims=True)
    dgamma_r = (dy * cache.x_hat).sum(axis=axes, keepdims=True)
    dz = dy * (cache.gamma * cache.r)
    sum_dz, sum_dz_z = _global_sums(cache.comm, dz.sum(axis=axes, keepdims=True), (dz * z).sum(axis=axes, keepdims=True))
    M = max(cache.M, 1)
    dx = cache.inv_std * (dz - sum_dz / M - z * (sum_dz_z / M))
    return _in_input_dtypes(dx, dgamma_r, dbeta_r, cache)


ops.define("sync_batch_renorm", sync_batch_renorm_forward, sync_batch_renorm_backward)


def sync_batch_renorm(x, gamma, beta, moving_mean, moving_var, *, training, comm, r_max=3.0, d_max=5.0,
                      momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS, check_channels=True):
    """Batch renorm of this rank's shard with the global batch's statistics; returns
    ``(y, new_moving_mean, new_moving_var, M)`` as :func:`sync_batch_norm` does. With one rank, or in prediction
    mode, this is :func:`tinybn.functional.batch_renorm` and communicates nothing."""
    if not training or comm.world_size == 1:
        y, new_mean, new_var = batch_renorm(x, gamma, beta, moving_mean, moving_var, training=training, r_max=r_max,
                                            d_max=d_max, momentum=momentum, eps=eps)
        return y, new_mean, new_var, _local_count(x, training)
    check_arguments(x, (gamma, beta, moving_mean, moving_var), training, eps, whole_batch=False)
    if not r_max >= 1.0 or not d_max >= 0.0:
        raise ValueError(f"sync_batch_renorm: r_max must be at least 1 and d_max at least 0, got r_max={r_max}, "
                         f"d_max={d_max}")
    check_momentum("sync_batch_renorm", momentum)
    y, mu, var, count = apply("sync_batch_renorm", x, gamma, beta, moving_mean, moving_var, r_max=r_max, d_max=d_max,
                              eps=eps, comm=comm, check_channels=check_channels)
    count = int(count.data)
    return (y, *new_moving_averages((moving_mean, mu), (moving_var, var), momentum=momentum, update=count > 0), count)


# ---------------------------------------------------------------------------------------------- decorrelated BN


def sync_decorrelated_batch_norm_forward(x, gamma, beta, moving_mean, moving_whitening, group_size=16,
                                         iterations=DEFAULT_ITERATIONS, eps=DEFAULT_EPS, comm=None):
    """Decorrelated BN's training forward (:mod:`tinybn.functional.whitening`) with the mean and covariance of the
    global batch; returns ``((y, μ (C,), W (C, C), M), cache)``."""
    xp = get_array_module(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    X = _channels_first(x)
    channels, m = X.shape
    X64 = X.astype(numpy.float64)
    mu_r = X64.mean(axis=1) if m else xp.zeros(channels)
    centered = X64 - mu_r[:, None]
    local = Moments(m, mu_r, centered @ centered.T)
    gathered = comm.all_gather(local.flat())
    parts = [Moments.from_flat(row, channels, matrix=True) for row in gathered]
    total = sum(part.count for part in parts)
    if total == 1:
        raise BatchTooSmallError(f"sync_decorrelated_batch_norm in training mode needs more than one value per "
                                 f"channel over all the ranks' shards, but they hold exactly one.")
    if total == 0:                       # every shard is empty: nothing to normalize, nothing to count
        y = (x * 0).astype(x_dtype, copy=False)
        return (y, moving_mean, moving_whitening, xp.asarray(0)), Cache(M=0, dtypes=(x_dtype, gamma.dtype, beta.dtype),
                                                                       shapes=(x.shape, gamma.shape, beta.shape))
    pooled = pool(parts)
    mu = pooled.mean.astype(X.dtype)
    Xc = X - mu[:, None]
    covariance = pooled.variance.astype(X.dtype)
    W, saved, rows = xp.zeros((channels, channels), X.dtype), [], []
    for first, last in groups(channels, group_size):
        sigma = covariance[first:last, first:last] + eps * xp.eye(last - first, dtype=X.dtype)
        W[first:last, first:last], entries = newton_schulz(sigma, iterations)
        rows.append(W[first:last, first:last] @ Xc[first:last])
        saved.append(dict(entries, Xc=Xc[first:last]))
    x_hat = _back_to_input_shape(xp.concatenate(rows, axis=0), x.shape)
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    g = gamma.reshape(per_channel)
    y = (g * x_hat + beta.reshape(per_channel)).astype(x_dtype, copy=False)
    cache = Cache(x_hat=x_hat, saved=saved, gamma=g, group_size=group_size, M=total, comm=comm,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu, W, xp.asarray(total)), cache


def sync_decorrelated_batch_norm_backward(dy, cache):
    """Per group: dW = Σ_ranks dx̂ Xcᵀ (one all_reduce for all the groups), then every rank backpropagates through
    the same Newton–Schulz steps; dX = dXc − (Σ_ranks Σ dXc)/M (a second all_reduce)."""
    xp = get_array_module(dy)
    if cache.M == 0:                     # every rank's shard was empty: every gradient is zero, and none is sent
        return (*(xp.zeros(shape, dtype) for shape, dtype in zip(cache.shapes, cache.dtypes)), None, None)
    x_hat = cache.x_hat
    dy = dy.astype(x_hat.dtype, copy=False)
    shared = (0,) + tuple(range(2, dy.ndim))
    dgamma, dbeta = (dy * x_hat).sum(axis=shared), dy.sum(axis=shared)
    dX_hat = _channels_first(dy * cache.gamma)
    spans = groups(dX_hat.shape[0], cache.group_size)
    dWs = _global_sums(cache.comm, *[dX_hat[a:b] @ saved["Xc"].T for (a, b), saved in zip(spans, cache.saved)])
    rows = []
    for (first, last), saved, dW in zip(spans, cache.saved, dWs):
        dsigma = newton_schulz_backward(dW, saved)
        rows.append(saved["W"].T @ dX_hat[first:last] + (dsigma + dsigma.T) @ saved["Xc"] / cache.M)
    dXc = xp.concatenate(rows, axis=0)
    (sums,) = _global_sums(cache.comm, dXc.sum(axis=1, keepdims=True))
    dX = dXc - sums / cache.M
    x_dtype, gamma_dtype, beta_dtype = cache.dtypes
    return (_back_to_input_shape(dX, dy.shape).astype(x_dtype, copy=False),
            dgamma.reshape(cache.gamma_shape).astype(gamma_dtype, copy=False),
            dbeta.reshape(cache.beta_shape).astype(beta_dtype, copy=False), None, None)


ops.define("sync_decorrelated_batch_norm", sync_decorrelated_batch_norm_forward, sync_decorrelated_batch_norm_backward)


def sync_decorrelated_batch_norm(x, gamma, beta, moving_mean, moving_whitening, *, training, comm, group_size=16,
                                 iterations=DEFAULT_ITERATIONS, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS):
    """Decorrelated BN of this rank's shard with the whitening of the global batch; returns
    ``(y, new_moving_mean, new_moving_whitening, M)``. With one rank, or in prediction mode, this is
    :func:`tinybn.functional.decorrelated_batch_norm` and communicates nothing."""
    if not training or comm.world_size == 1:
        y, new_mean, new_whitening = decorrelated_batch_norm(x, gamma, beta, moving_mean, moving_whitening,
                                                             training=training, group_size=group_size,
                                                             iterations=iterations, momentum=momentum, eps=eps)
        return y, new_mean, new_whitening, _local_count(x, training)
    check_whitening_arguments(x, gamma, beta, moving_mean, moving_whitening, group_size, iterations, eps,
                              training=False)
    check_momentum("sync_decorrelated_batch_norm", momentum)
    y, mu, W, count = apply("sync_decorrelated_batch_norm", x, gamma, beta, moving_mean, moving_whitening,
                            group_size=int(group_size), iterations=int(iterations), eps=eps, comm=comm)
    count = int(count.data)
    return (y, *new_moving_averages((moving_mean, mu), (moving_whitening, W), momentum=momentum, update=count > 0),
            count)
