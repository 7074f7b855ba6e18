r"""Moments of values per channel, and how the moments of several parts pool into those of the whole.

Batch norm, and every tool that gathers its statistics, asks the same question: given the values of a channel
in several parts (the batches of a precise-statistics pass, the ranks' shards of a global batch), what are the
mean and variance of all of them together? Each part keeps three numbers per channel, and they pool exactly::

    part r:    n_r values,   μ_r = (1/n_r) Σ x,   M2_r = Σ (x − μ_r)²
    whole:     N  = Σ_r n_r
               μ  = Σ_r n_r μ_r / N
               M2 = Σ_r M2_r + Σ_r n_r (μ_r − μ)²           (the parallel-axis theorem; Chan et al., 1979)
               σ² = M2 / N                                    (biased, as batch norm's)

The second term is the spread between the parts' means, which an average of the parts' variances would miss.
Nothing here subtracts two large sums (no E[x²] − E[x]²), so the variance keeps its digits when |μ| ≫ σ. For
decorrelated batch norm M2 is a matrix, Σ (x − μ)(x − μ)ᵀ, and (μ_r − μ)² becomes (μ_r − μ)(μ_r − μ)ᵀ.

Everything is in float64, whatever the values' dtype: the parts' counts can be large, and the pooled numbers are
what the moving statistics are set to.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy

from ..backend import get_array_module


@dataclass
class Moments:
    """``count`` values per channel, their ``mean`` (C,) and ``m2``: Σ (x − mean)² (C,) or, for a covariance,
    Σ (x − mean)(x − mean)ᵀ (C, C). Arrays of NumPy or CuPy, float64."""
    count: int
    mean: object
    m2: object

    @property
    def variance(self):
        """M2 / count: the biased variance per channel, or the biased covariance matrix."""
        return self.m2 / max(self.count, 1)

    def flat(self):
        """``[count, mean..., m2...]`` as one float64 vector, to send to other ranks in one message."""
        xp = get_array_module(self.mean)
        return xp.concatenate([xp.asarray([float(self.count)]), self.mean.reshape(-1), self.m2.reshape(-1)])

    @staticmethod
    def from_flat(vector, channels: int, matrix: bool = False) -> "Moments":
        """The inverse of :meth:`flat` for ``channels`` channels (``matrix``: ``m2`` is (C, C))."""
        m2 = vector[1 + channels:]
        return Moments(int(vector[0]), vector[1:1 + channels], m2.reshape(channels, channels) if matrix else m2)


def moments(x, axes) -> Moments:
    """The moments of ``x`` over ``axes`` (the values of each channel), per remaining axis, in float64."""
    xp = get_array_module(x)
    x = x.astype(numpy.float64)
    count = int(numpy.prod([x.shape[axis] for axis in axes])) if axes else 1
    if count == 0:
        channels = int(numpy.prod([n for axis, n in enumerate(x.shape) if axis not in axes]))
        return Moments(0, xp.zeros(channels), xp.zeros(channels))
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    return Moments(count, mean.reshape(-1), (centered * centered).sum(axis=axes).reshape(-1))


def covariance_moments(X) -> Moments:
    """The moments of X (C, m), m values per channel, with the full matrix M2 = Xc Xcᵀ (C, C), in float64."""
    xp = get_array_module(X)
    X = X.astype(numpy.float64)
    count = X.shape[1]
    if count == 0:
        return Moments(0, xp.zeros(X.shape[0]), xp.zeros((X.shape[0], X.shape[0])))
    mean = X.mean(axis=1)
    centered = X - mean[:, None]
    return Moments(count, mean, centered @ centered.T)


def pool(parts) -> Moments:
    """The moments of all the values of ``parts`` together (the formula above); parts without values add
    nothing. Every caller pools in the order given, so ranks that pool the same parts get the same bits."""
    parts = [part for part in parts if part.count > 0]
    if not parts:
        raise ValueError("pool: no part holds any value, so there are no moments to pool")
    total = sum(part.count for part in parts)
    mean = sum(part.count * part.mean for part in parts) / total
    m2 = sum(part.m2 for part in parts)
    for part in parts:
        delta = part.mean - mean
        xp = get_array_module(delta)
        m2 = m2 + part.count * (xp.outer(delta, delta) if part.m2.ndim == 2 else delta * delta)
    return Moments(total, mean, m2)


def pool_across_ranks(local: Moments, comm, matrix: bool = False) -> Moments:
    """The moments of every rank's values together, the same on every rank (one all_gather)."""
    if comm is None or comm.world_size == 1:
        return local
    channels = local.mean.size
    gathered = comm.all_gather(local.flat())
    parts = [Moments.from_flat(gathered[rank], channels, matrix) for rank in range(comm.world_size)]
    if not any(part.count for part in parts):
        return local
    return pool(parts)
