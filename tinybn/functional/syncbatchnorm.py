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
"""
from __future__ import annotations

import numpy

from .. import backend, ops
from ..autograd import Cache, Tensor, apply
from ..backend import get_array_module
from .batchnorm import (DEFAULT_EPS, DEFAULT_MOMENTUM, _in_input_dtypes, _per_channel, batch_norm, check_arguments,
                        check_momentum, compute_dtype, new_moving_averages, reduction_axes)


def sync_batch_norm_forward(x, gamma, beta, moving_mean, moving_var, eps=DEFAULT_EPS, comm=None, check_channels=True):
    """Training-mode forward over the ranks of ``comm``; returns ``((y, μ, σ², M), cache)``: μ and σ² per channel
    (C,) over the global batch, M the global number of values per channel (a 0-d array). With no value on any
    rank (M = 0) the moving averages normalize, as for an empty batch in plain batch norm."""
    xp = get_array_module(x)
    axes = reduction_axes(x)
    channels = x.shape[1]
    m = x.size // channels if channels else 0
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    if m:
        mu_r = x.mean(axis=axes)
        x_centered = x - _per_channel(mu_r, x)
        m2_r = (x_centered * x_centered).sum(axis=axes)
    else:
        mu_r = m2_r = xp.zeros(channels, x.dtype)
    # [C, m_r, μ_r, M2_r] in float64 (ranks may compute in different dtypes). C goes first so that ranks that
    # disagree on it are caught: MPI fails on the rank with fewer channels, and this check on the others.
    if check_channels:    # gathers of different sizes are an MPI error that ends some ranks and not others
        others = comm.all_gather(xp.asarray([channels], numpy.float64)).reshape(-1)
        if bool((others != channels).any()):
            raise ValueError(f"sync_batch_norm: the ranks disagree on the number of channels "
                             f"({', '.join(str(int(c)) for c in backend.to_numpy(others))} on ranks 0 to "
                             f"{len(others) - 1}); every rank must run the same layer")
    local = xp.concatenate([xp.asarray([channels, m], numpy.float64), mu_r.astype(numpy.float64),
                            m2_r.astype(numpy.float64)])
    gathered = comm.all_gather(local)                       # (P, 2C + 2), the same on every rank
    if bool((gathered[:, 0] != channels).any()):
        raise ValueError(f"sync_batch_norm: the ranks disagree on the number of channels (this rank, "
                         f"{comm.rank}, has {channels}); every rank must run the same layer")
    counts, means, m2s = gathered[:, 1:2], gathered[:, 2:channels + 2], gathered[:, channels + 2:]
    M = int(counts.sum())
    if M == 1:
        raise ValueError(f"sync_batch_norm in training mode needs more than one value per channel over all the "
                         f"ranks' shards, but they hold exactly one (this rank's shard has shape {tuple(x.shape)}): "
                         f"every normalized value would be 0. Use a larger batch, or switch the layer to eval mode.")
    if M == 0:
        mu, var = moving_mean.reshape(-1).astype(x.dtype), moving_var.reshape(-1).astype(x.dtype)
    else:
        mu64 = (counts * means).sum(axis=0) / M
        var64 = (m2s.sum(axis=0) + (counts * (means - mu64) ** 2).sum(axis=0)) / M
        mu, var = mu64.astype(x.dtype), var64.astype(x.dtype)
    inv_std = 1.0 / xp.sqrt(_per_channel(var, x) + eps)
    x_hat = (x - _per_channel(mu, x)) * inv_std
    g, b = _per_channel(gamma, x), _per_channel(beta, x)
    y = (g * x_hat + b).astype(x_dtype, copy=False)
    cache = Cache(x_hat=x_hat, inv_std=inv_std, gamma=g, axes=axes, M=M, comm=comm,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu, var, xp.asarray(M)), cache


def sync_batch_norm_backward(dy, cache):
    """``(dx, dgamma_r, dbeta_r, None, None)``; one all_reduce of Σdy and Σdy·x̂ per call, on every rank."""
    xp = get_array_module(dy)
    axes, x_hat = cache.axes, cache.x_hat
    dy = dy.astype(x_hat.dtype, copy=False)
    dbeta_r = dy.sum(axis=axes, keepdims=True)               # this rank's share: the parameters' gradients
    dgamma_r = (dy * x_hat).sum(axis=axes, keepdims=True)
    channels = x_hat.shape[1]
    local = xp.concatenate([dbeta_r.reshape(-1), dgamma_r.reshape(-1)]).astype(numpy.float64)  # one dtype on all ranks
    sums = cache.comm.all_reduce(local).astype(x_hat.dtype)
    dbeta, dgamma = _per_channel(sums[:channels], x_hat), _per_channel(sums[channels:], x_hat)
    M = max(cache.M, 1)                                       # M = 0: nothing to send back, and no 0/0
    dx = (cache.gamma * cache.inv_std) * (dy - dbeta / M - x_hat * (dgamma / M))
    return _in_input_dtypes(dx, dgamma_r, dbeta_r, cache)


ops.define("sync_batch_norm", sync_batch_norm_forward, sync_batch_norm_backward)


def sync_batch_norm(x, gamma, beta, moving_mean, moving_var, *, training, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS,
                    comm=None, check_channels=True):
    """Batch-normalize this rank's shard ``x`` with the statistics of the global batch; returns
    ``(y, new_moving_mean, new_moving_var, M)``, M the number of values per channel in the global batch.

    The arguments and results are :func:`~tinybn.functional.batch_norm`'s, plus M: a rank cannot tell from
    its own shard whether the batch held any value (an empty global batch leaves the moving averages as they
    are, and a layer should not count it). ``comm`` is a :class:`tinybn.distributed.Communicator`
    (default: :func:`tinybn.distributed.get_communicator`). With one rank, or in prediction mode, this is
    plain batch norm and communicates nothing.

    ``check_channels`` first makes sure every rank has the same number of channels, with one more small
    collective: ranks that disagree then all get this error, instead of MPI's "message truncated" on some and
    nothing on others. :class:`tinybn.nn.SyncBatchNorm` checks on its first training call only.
    """
    from ..distributed import get_communicator

    comm = comm or get_communicator()
    if not training or comm.world_size == 1:
        y, new_mean, new_var = batch_norm(x, gamma, beta, moving_mean, moving_var, training=training,
                                          momentum=momentum, eps=eps)
        data = x.data if isinstance(x, Tensor) else x
        return y, new_mean, new_var, (data.size // data.shape[1] if training and data.ndim > 1 and data.shape[1]
                                      else 0)
    # the single value per channel that plain batch norm refuses is checked over all the shards, in the forward
    check_arguments(x, (gamma, beta, moving_mean, moving_var), training, eps, whole_batch=False)
    check_momentum("sync_batch_norm", momentum)
    y, mu, var, count = apply("sync_batch_norm", x, gamma, beta, moving_mean, moving_var, eps=eps, comm=comm,
                              check_channels=check_channels)
    count = int(count.data)
    return (y, *new_moving_averages((moving_mean, mu), (moving_var, var), momentum=momentum, update=count > 0), count)
