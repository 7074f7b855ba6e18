r"""Batch renormalization (Ioffe, 2017): batch norm that trains with small or unrepresentative batches.

Batch norm trains with the batch's statistics and predicts with the moving averages; with small batches the
two differ, and the network learns to rely on the batch's noise. Batch renorm corrects the batch's
standardization towards the moving averages during training, with factors that carry no gradient::

    μ_B, σ_B  = batch mean, √(biased batch variance + ε)        (per channel, as in batch norm)
    σ         = √(moving_var + ε)
    r         = clip(σ_B / σ, 1/r_max, r_max)                     constants in the backward
    d         = clip((μ_B − moving_mean) / σ, −d_max, d_max)      constants in the backward
    x̂         = (x − μ_B) / σ_B · r + d
    y         = γ · x̂ + β

Without clipping, x̂ = (x − moving_mean) / σ: exactly what prediction mode computes, whatever the batch.
r_max = 1 and d_max = 0 give batch norm. The paper starts there and relaxes the limits over the first
steps (here :func:`renorm_limits`, a linear warm-up, as a layer argument). The moving averages follow
batch norm's convention (:func:`tinybn.functional.batchnorm.moving_average`).

Backward (docs/derivations.md, "Batch renormalization"). With z = (x − μ_B)/σ_B, x̂ = r·z + d and r, d
constants, dz = r · γ · dy, and z's backward is batch norm's::

    dx = (1/σ_B) · (dz − mean(dz) − z · mean(dz · z))
    dγ = Σ dy · x̂        dβ = Σ dy

Prediction mode is batch norm's: x̂ = (x − moving_mean) / σ.
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module
from .batchnorm import (DEFAULT_EPS, _in_input_dtypes, _per_channel, check_arguments, check_momentum, compute_dtype,
                        mean_square, new_moving_averages, reduction_axes)

DEFAULT_MOMENTUM = 0.99    # the moving averages take part in training here: they must be smooth (the paper: 0.99)


def renorm_limits(step: int, r_max: float, d_max: float, warmup_steps: int) -> tuple[float, float]:
    """The limits at training step ``step`` (0-based): r_max from 1 and d_max from 0, linearly, reaching the
    given values after ``warmup_steps`` (at once when 0). Early on the moving averages are still far from
    the data's statistics, and correcting towards them would only add noise."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"renorm_limits: step and warmup_steps must be at least 0, got {step} and {warmup_steps}")
    progress = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    return 1.0 + (r_max - 1.0) * progress, d_max * progress


def batch_renorm_forward(x, gamma, beta, moving_mean, moving_var, training, r_max=3.0, d_max=5.0, eps=DEFAULT_EPS):
    """``((y, μ_B, σ²_B), cache)``; in prediction mode μ and σ² are the moving averages."""
    xp = get_array_module(x)
    axes = reduction_axes(x)
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    g, b = _per_channel(gamma, x), _per_channel(beta, x)
    mean, sigma = _per_channel(moving_mean, x), xp.sqrt(_per_channel(moving_var, x) + eps)
    if training:
        mu = x.mean(axis=axes, keepdims=True)
        x_centered = x - mu
        var = mean_square(x_centered, axes)
        sigma_batch = xp.sqrt(var + eps).astype(x.dtype, copy=False)
        var = var.astype(x.dtype, copy=False)
        r = xp.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
        d = xp.clip((mu - mean) / sigma, -d_max, d_max)
        z = x_centered / sigma_batch
        x_hat = z * r + d
    else:
        mu, var = mean, _per_channel(moving_var, x)
        z, r, sigma_batch = (x - mean) / sigma, None, sigma
        x_hat = z
    y = (g * x_hat + b).astype(x_dtype, copy=False)
    cache = Cache(z=z, x_hat=x_hat, r=r, inv_std=1.0 / sigma_batch, gamma=g, axes=axes, training=training,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu.reshape(-1), var.reshape(-1)), cache


def batch_renorm_backward(dy, cache):
    axes, z = cache.axes, cache.z
    dy = dy.astype(z.dtype, copy=False)
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * cache.x_hat).sum(axis=axes, keepdims=True)
    if cache.training:
        dz = dy * (cache.gamma * cache.r)
        dx = cache.inv_std * (dz - dz.mean(axis=axes, keepdims=True) - z * (dz * z).mean(axis=axes, keepdims=True))
    else:
        dx = dy * (cache.gamma * cache.inv_std)
    return _in_input_dtypes(dx, dgamma, dbeta, cache)


ops.define("batch_renorm", batch_renorm_forward, batch_renorm_backward)


def batch_renorm(x, gamma, beta, moving_mean, moving_var, *, training, r_max=3.0, d_max=5.0,
                 momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS):
    """Batch renormalization; returns ``(y, new_moving_mean, new_moving_var)`` as
    :func:`~tinybn.functional.batch_norm` does (shapes, checks and moving averages are batch norm's)."""
    check_arguments(x, (gamma, beta, moving_mean, moving_var), training, eps)
    if not r_max >= 1.0 or not d_max >= 0.0:
        raise ValueError(f"batch_renorm: r_max must be at least 1 and d_max at least 0 (1 and 0 are batch norm), got "
                         f"r_max={r_max}, d_max={d_max}")
    if training:
        check_momentum("batch_renorm", momentum)
    training = training and x.size > 0
    y, mu, var = apply("batch_renorm", x, gamma, beta, moving_mean, moving_var, training=training, r_max=r_max,
                       d_max=d_max, eps=eps)
    return (y, *new_moving_averages((moving_mean, mu), (moving_var, var), momentum=momentum, update=training))
