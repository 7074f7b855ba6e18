r"""Batch normalization: the mathematics (the layers in :mod:`tinybn.nn` do the bookkeeping).

Inputs and shapes
-----------------
x is either (N, D) — a fully-connected layer's output, normalized per feature — or
(N, C, H, W) — a convolution's output, normalized per channel over all N·H·W positions.
Call the normalized groups "channels" (D or C of them) and let m be the number of values per
channel (N, or N·H·W). ``gamma``, ``beta``, ``moving_mean`` and ``moving_var`` hold one value per
channel, shaped (C,), (1, C) or (1, C, 1, 1); results come back in the shapes given.

Forward
-------
Training mode uses the statistics of the minibatch::

    μ     = (1/m) Σ x                     (per channel)
    σ²    = (1/m) Σ (x − μ)²              biased, computed from x − μ (two passes, see below)
    x̂     = (x − μ) / √(σ² + ε)
    y     = γ · x̂ + β

Prediction mode uses the moving averages instead of μ and σ², and leaves them unchanged.

Moving averages: tinybn's convention, written down once
--------------------------------------------------------
After each training step::

    new_moving_mean = momentum · moving_mean + (1 − momentum) · μ
    new_moving_var  = momentum · moving_var  + (1 − momentum) · σ²        (σ² biased)

with ``momentum = 0.9`` by default, so ``momentum`` is the weight of the OLD value — the
chapter's convention, and Keras' (``BatchNormalization(momentum=0.99)``).

* PyTorch's ``momentum`` is the weight of the NEW value: tinybn ``momentum = 1 − torch_momentum``,
  so PyTorch's default 0.1 is tinybn's 0.9. PyTorch also feeds the *unbiased* batch variance
  σ² · m/(m − 1) into ``running_var``; tinybn (like the chapter) feeds the biased one. The two
  differ by a factor m/(m−1): 1.0000064 for a 256×24×24 conv batch, 1.004 for a 256-row dense batch.
* Keras' ``momentum`` means what tinybn's means; its ``moving_variance`` uses the biased variance too.

float16
-------
float16 holds at most 65,504 and about 3 decimal digits: a square (x − μ)² overflows once |x − μ| > 256,
and a sum over m values soon after. The statistics, x̂ and the gradients are therefore computed in
float32 when x is float16 (in x's own dtype otherwise); y, dx and the new moving averages are
rounded to their inputs' dtypes once, at the end. This is what PyTorch does on half-precision input.

Why two passes for σ²
---------------------
E[x²] − E[x]² subtracts two nearly equal numbers when |μ| ≫ σ: for float32 data with mean 1e4
and std 1, E[x²] ≈ 1e8 carries only about 8 significant bits of the variance and the result can be
0 or negative. Subtracting μ first and then averaging the squares keeps every digit.

The squares themselves overflow float32 once |x − μ| passes about 1.8e19; σ² would be inf and every x̂ 0, so
y would be β everywhere. :func:`mean_square` then averages the squares again in float64, where they fit, and
1/√(σ² + ε) comes back to float32 (it is tiny, not zero): the output is right, with standard deviation 1.

Backward
--------
Two implementations, checked equal in the tests (derivations: docs/derivations.md, "Batch normalization"):

* :func:`batch_norm_backward_staged` walks the forward graph in reverse, one line per forward line;
* :func:`batch_norm_backward` is the closed form that the staged one simplifies to::

      dβ = Σ dy        dγ = Σ dy · x̂        dx̂ = dy · γ
      dx = (1/√(σ² + ε)) · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))        (means per channel over m values)

In prediction mode the statistics are constants, so dx = dy · γ / √(moving_var + ε).

The op (``batch_norm_forward``/``batch_norm_backward``, registered as ``"batch_norm"``) computes y and the
statistics it normalized with; :func:`batch_norm` around it checks the arguments and applies the
moving-average convention, for every implementation.

What runs is this code, unless a program asks for a kernel family (``tinybn.kernels.use("numba")``, as
``python -m tinybn`` and the examples do): then a compiled kernel of the op runs instead, on NumPy float32 and
float64 arrays (``tinybn/numba_kernels/batchnorm.py``, tested equal to this code). ``tinybn.kernels.active()`` says which family runs, and
``tinybn.ops.Recorder`` which implementation of which op ran.
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, Tensor, apply
from ..backend import get_array_module

DEFAULT_MOMENTUM = 0.9
DEFAULT_EPS = 1e-5


class BatchTooSmallError(ValueError):
    """A normalization in training mode was given one value per channel (a batch of one example, say), so every
    normalized value would be 0. ``reason`` says so without the advice, for callers that give their own."""

    def __init__(self, reason: str, advice: str = "Use a larger batch, or switch the layer to eval mode."):
        super().__init__(f"{reason} {advice}")
        self.reason = reason


def torch_momentum_to_tinybn(torch_momentum: float) -> float:
    """PyTorch weighs the new batch statistic by ``momentum``; tinybn weighs the old average."""
    return 1.0 - torch_momentum


def moving_average(moving, batch_statistic, momentum):
    """``momentum · moving + (1 − momentum) · batch_statistic``, in ``moving``'s shape and dtype: the convention
    above, and the one place that applies it."""
    new = momentum * moving + (1.0 - momentum) * batch_statistic.reshape(moving.shape)
    return new.astype(moving.dtype, copy=False)


def reduction_axes(x) -> tuple[int, ...]:
    """The axes batch norm averages over: (0,) for (N, D) input, (0, 2, 3) for (N, C, H, W)."""
    if x.ndim == 2:
        return (0,)
    if x.ndim == 4:
        return (0, 2, 3)
    raise ValueError(f"batch_norm expects a 2-D (N, features) or 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")


def _per_channel(value, x):
    """View a per-channel array (C,), (1, C) or (1, C, 1, 1) in the shape that broadcasts against x."""
    return value.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))


def compute_dtype(xp, dtype):
    """The dtype batch norm computes in: float32 for float16 input (see "float16" above), else the input's."""
    return xp.promote_types(dtype, xp.float32)


def check_floating(op: str, x) -> None:
    """Normalized values are fractions: an integer input would have them rounded back to integers."""
    kind = getattr(getattr(x, "dtype", None), "kind", "f")
    if kind != "f":
        raise ValueError(f"{op} expects a floating-point input, got dtype {x.dtype}; convert it first, e.g. "
                         f"x.astype('float32')")


def check_arguments(x, per_channel, training: bool, eps: float, whole_batch: bool = True) -> None:
    """Every check batch norm makes, for every implementation: the rank, one value per channel in each of
    γ, β and the moving averages, more than one value per channel (when ``x`` is the whole batch, not one
    rank's shard of it) and a positive eps in training."""
    reduction_axes(x)
    check_floating("batch_norm", x)
    for value in per_channel:
        if value.size != x.shape[1]:
            raise ValueError(f"batch_norm: a per-channel array of shape {tuple(value.shape)} does not match the "
                             f"{x.shape[1]} channels of an input of shape {tuple(x.shape)}")
    if training and whole_batch and x.size and x.size == x.shape[1]:
        raise BatchTooSmallError(f"batch_norm in training mode needs more than one value per channel, but an input "
                                 f"of shape {tuple(x.shape)} has exactly one: every normalized value would be 0 and "
                                 f"nothing could be learned.")
    if training and not eps > 0:
        raise ValueError(f"batch_norm: eps must be positive in training mode, got {eps}: a channel whose values "
                         f"are all equal would divide by zero (the default is {DEFAULT_EPS})")


def mean_square(x_centered, axes):
    """mean((x − μ)²) over ``axes`` (keepdims). Where the squares overflow (float32 beyond |x − μ| ≈ 1.8e19) it is
    taken again in float64 and returned in float64: the caller casts what it keeps (see "Why two passes")."""
    xp = get_array_module(x_centered)
    var = (x_centered * x_centered).mean(axis=axes, keepdims=True)
    if x_centered.dtype.itemsize < 8 and x_centered.size and not bool(xp.isfinite(var).all()):
        wide = x_centered.astype(xp.float64)
        var = (wide * wide).mean(axis=axes, keepdims=True)
    return var


def batch_norm_forward(x, gamma, beta, moving_mean, moving_var, training, eps=DEFAULT_EPS):
    """Forward pass; returns ``((y, μ, σ²), cache)``, μ and σ² per channel (C,): the batch's in training mode,
    the moving averages in prediction mode."""
    xp = get_array_module(x)
    axes = reduction_axes(x)
    m = x.size // x.shape[1]
    x_dtype = x.dtype
    x = x.astype(compute_dtype(xp, x_dtype), copy=False)
    g, b = _per_channel(gamma, x), _per_channel(beta, x)
    if training:
        mu = x.mean(axis=axes, keepdims=True)
        x_centered = x - mu
        var = mean_square(x_centered, axes)
    else:
        mu, var = _per_channel(moving_mean, x), _per_channel(moving_var, x)
        x_centered = x - mu
    inv_std = (1.0 / xp.sqrt(var + eps)).astype(x.dtype, copy=False)
    var = var.astype(x.dtype, copy=False)
    x_hat = x_centered * inv_std
    y = (g * x_hat + b).astype(x_dtype, copy=False)
    cache = Cache(x_hat=x_hat, inv_std=inv_std, gamma=g, axes=axes, m=m, training=training,
                  gamma_shape=gamma.shape, beta_shape=beta.shape, dtypes=(x_dtype, gamma.dtype, beta.dtype))
    return (y, mu.reshape(-1), var.reshape(-1)), cache


def _in_input_dtypes(dx, dgamma, dbeta, cache):
    """The gradients, each rounded to its input's dtype (a no-op unless the input was float16)."""
    x_dtype, gamma_dtype, beta_dtype = cache.dtypes
    return (dx.astype(x_dtype, copy=False), dgamma.reshape(cache.gamma_shape).astype(gamma_dtype, copy=False),
            dbeta.reshape(cache.beta_shape).astype(beta_dtype, copy=False), None, None)


def batch_norm_backward(dy, cache):
    """Closed-form backward: ``(dx, dgamma, dbeta, None, None)``."""
    axes, x_hat = cache.axes, cache.x_hat
    dy = dy.astype(x_hat.dtype, copy=False)
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
    if cache.training:
        # dx = inv_std · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)), with dx̂ = dy·γ; both means reuse dβ and dγ.
        dx = (cache.gamma * cache.inv_std) * (dy - dbeta / cache.m - x_hat * (dgamma / cache.m))
    else:
        dx = dy * (cache.gamma * cache.inv_std)
    return _in_input_dtypes(dx, dgamma, dbeta, cache)


def batch_norm_backward_staged(dy, cache):
    """Staged backward: the forward's steps, undone one at a time (same result as the closed form)."""
    xp = get_array_module(dy)
    axes, m, inv_std = cache.axes, cache.m, cache.inv_std
    dy = dy.astype(cache.x_hat.dtype, copy=False)
    # y = γ·x̂ + β
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * cache.x_hat).sum(axis=axes, keepdims=True)
    dx_hat = dy * cache.gamma
    if not cache.training:
        return _in_input_dtypes(dx_hat * inv_std, dgamma, dbeta, cache)
    x_centered = cache.x_hat / inv_std
    # x̂ = x_centered · inv_std
    dx_centered = dx_hat * inv_std
    dinv_std = (dx_hat * x_centered).sum(axis=axes, keepdims=True)
    # inv_std = (σ² + ε)^(−1/2), so d inv_std / dσ² = −½ (σ² + ε)^(−3/2) = −½ inv_std³
    dvar = dinv_std * (-0.5) * inv_std ** 3
    # σ² = mean(x_centered²)
    dx_centered = dx_centered + dvar * 2.0 * x_centered / m
    # x_centered = x − μ
    dx = dx_centered
    dmu = -dx_centered.sum(axis=axes, keepdims=True)
    # μ = mean(x)
    dx = dx + xp.broadcast_to(dmu / m, dx.shape)
    return _in_input_dtypes(dx, dgamma, dbeta, cache)


ops.define("batch_norm", batch_norm_forward, batch_norm_backward)


def batch_norm(x, gamma, beta, moving_mean, moving_var, *, training, momentum=DEFAULT_MOMENTUM, eps=DEFAULT_EPS):
    """Batch-normalize ``x``; returns ``(y, new_moving_mean, new_moving_var)``.

    Training mode normalizes with the minibatch mean and biased variance and returns updated moving
    averages (``new = momentum·old + (1 − momentum)·batch``, :func:`moving_average`); prediction mode
    normalizes with the moving averages and returns them unchanged. The function never modifies its
    arguments: the caller (a layer) decides what to do with the new averages. See the module docstring
    for shapes, formulas and the conversion to PyTorch's and Keras' momentum.

    ``eps`` must be positive in training mode, as in PyTorch: a channel whose values in the batch are all
    equal has σ² = 0, and 1/√(σ² + 0) would turn its outputs into NaN.
    """
    check_arguments(x, (gamma, beta, moving_mean, moving_var), training, eps)
    if training:
        check_momentum("batch_norm", momentum)
    # An empty batch has no statistics: it is normalized (into nothing) with the moving averages, which it
    # leaves as they are, as in PyTorch; averaging over no values would make them NaN for good.
    training = training and x.size > 0
    y, mu, var = apply("batch_norm", x, gamma, beta, moving_mean, moving_var, training=training, eps=eps)
    return (y, *new_moving_averages((moving_mean, mu), (moving_var, var), momentum=momentum, update=training))


def check_momentum(op: str, momentum) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1] (the weight of the old moving average), got {momentum}")


def new_moving_averages(*pairs, momentum, update: bool):
    """For each ``(moving, batch_statistic)`` pair, the moving average after this step, as a tensor: updated by
    :func:`moving_average` when ``update``, else as it was. The layers store what this returns."""
    result = []
    for moving, statistic in pairs:
        moving = moving.data if isinstance(moving, Tensor) else moving
        if update:
            moving = moving_average(moving, statistic.data if isinstance(statistic, Tensor) else statistic, momentum)
        result.append(Tensor(moving))
    return result
