"""Flatten without a copy in batch-last memory: :mod:`tinybn.functional.shape`.

A batch-last (C, H, W, N) array is already (C·H·W, N) in memory, so the flattened (N, C·H·W) tensor is a view of
it, and so is the gradient on the way back. (The reference reshapes the (N, C, H, W) view, which copies it.) No
numba here: NumPy's views are the whole kernel.
"""
from __future__ import annotations

import numpy

from .. import ops
from ..autograd import Cache
from ._common import _LAST, batch_first, batch_last, floats


def flatten_forward(x):
    x_last = batch_last(x)
    return batch_first(x_last.reshape(-1, x.shape[0])), Cache(x_last_shape=x_last.shape)


def flatten_backward(dy, cache):
    return (batch_first(batch_last(dy).reshape(cache.x_last_shape)),)


def _applies(x):
    """A batch-last input (from a kernel of this family): the flatten is then a view."""
    return floats(x) and x.ndim > 2 and x.transpose(_LAST[x.ndim]).flags.c_contiguous


ops.register_kernel("flatten", "numba", flatten_forward, flatten_backward, applies=_applies)
