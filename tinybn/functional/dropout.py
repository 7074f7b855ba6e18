"""Inverted dropout.

Training, with keep-mask m[i] ~ Bernoulli(1 − p)::

    y = x · m / (1 − p)          dx = dy · m / (1 − p)

Dividing by (1 − p) at training time keeps E[y] = x, so prediction is the identity
(y = x, dx = dy) and needs no rescaling. p = 1 drops everything (y = 0).
"""
from __future__ import annotations

from .. import ops
from .. import random as tb_random
from ..autograd import Cache, apply
from ..backend import get_array_module


def dropout_forward(x, p, training, generator=None):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x, Cache(scale=None)
    xp = get_array_module(x)
    if p == 1.0:
        scale = xp.zeros_like(x)
    else:
        generator = generator or tb_random.generator(xp)
        keep = generator.random(x.shape, dtype=x.dtype) >= p
        scale = keep.astype(x.dtype) * (1.0 / (1.0 - p))
    return x * scale, Cache(scale=scale)


def dropout_backward(dy, cache):
    return (dy if cache.scale is None else dy * cache.scale,)


ops.define("dropout", dropout_forward, dropout_backward)


def dropout(x, p=0.5, training=True, generator=None):
    """Zero each element with probability ``p`` and scale the rest by 1/(1−p); identity when not training.

    ``generator`` is an ``xp.random.Generator``; by default tinybn's seeded one (:func:`tinybn.manual_seed`).
    """
    return apply("dropout", x, p=p, training=training, generator=generator)
