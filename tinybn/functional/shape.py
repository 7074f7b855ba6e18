"""Flatten: (N, d1, d2, ...) -> (N, d1·d2·...). Its backward only restores the shape."""
from __future__ import annotations

import numpy

from .. import ops
from ..autograd import Cache, apply


def flatten_forward(x):
    features = int(numpy.prod(x.shape[1:]))       # not -1: an empty batch leaves nothing to infer it from
    return x.reshape(x.shape[0], features), Cache(shape=x.shape)


def flatten_backward(dy, cache):
    return (dy.reshape(cache.shape),)


ops.define("flatten", flatten_forward, flatten_backward)


def flatten(x):
    """Keep the batch axis and merge all the others."""
    return apply("flatten", x)
