"""The sigmoid, elementwise, in whatever memory order its input has: :mod:`tinybn.functional.activation`.

Read the reference first. With e = e^(−|x|) ≤ 1, y = 1/(1 + e) for x ≥ 0 and y = e/(1 + e) for x < 0 (no overflow
for any x), and dx = dy · y · (1 − y). The output keeps the input's layout (batch-last stays batch-last), and the
loop runs over the numbers in memory order, shared among the threads.
"""
from __future__ import annotations

import math

import numba
import numpy

from .. import ops
from ..autograd import Cache
from ._common import PARALLEL, floats, run_on_threads


@numba.njit(**PARALLEL)
def _forward(x, y):
    for k in numba.prange(x.size):
        e = math.exp(-abs(x[k]))
        y[k] = 1.0 / (1.0 + e) if x[k] >= 0 else e / (1.0 + e)


@numba.njit(**PARALLEL)
def _backward(dy, y, dx):
    for k in numba.prange(y.size):
        dx[k] = dy[k] * y[k] * (1.0 - y[k])


def _flat(array):
    """The 1-D view of a dense array's numbers in memory order (a copy for a strided slice)."""
    return array.ravel(order="K")


def sigmoid_forward(x):
    """:func:`tinybn.functional.activation.sigmoid_forward`."""
    y = numpy.empty_like(x)                      # dense, in x's memory order
    run_on_threads()
    _forward(_flat(x), _flat(y))
    return y, Cache(y=y)


def sigmoid_backward(dy, cache):
    """:func:`tinybn.functional.activation.sigmoid_backward`."""
    y = cache.y
    if dy.strides != y.strides:                  # dy in y's memory order, so that the flat views line up
        dy, copy = numpy.empty_like(y), dy
        dy[...] = copy
    dx = numpy.empty_like(y)
    run_on_threads()
    _backward(_flat(dy), _flat(y), _flat(dx))
    return (dx,)


def _applies(x):
    return floats(x)


ops.register_kernel("sigmoid", "numba", sigmoid_forward, sigmoid_backward, applies=_applies)
