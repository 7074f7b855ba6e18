"""Max pooling with the stride equal to the kernel (no padding) over batch-last memory:
:mod:`tinybn.functional.pooling`'s ``max_pool2d``.

Read the reference first (docs/derivations.md, "Pooling"). The windows do not overlap, so every input position
belongs to exactly one window::

    y[c, i, j, :]   = max_{p, q} x[c, i·kH + p, j·kW + q, :]      the first maximum, in row-major order, a NaN winning
    dx[c, i·kH + p, j·kW + q, :] = dy[c, i, j, :] where (p, q) is that maximum, else 0

The forward keeps x (alive anyway) and y; the backward finds each window's first maximum again by comparing them,
which costs less than tracking its position in the forward (a byte per output slowed the forward fivefold).
"""
from __future__ import annotations

import numba
import numpy

from .. import ops
from ..autograd import Cache
from ..functional._util import pair
from ._common import PARALLEL, batch_first, batch_last, floats, run_on_threads


@numba.njit(**PARALLEL)
def _forward(x, kh, kw, y):
    """Each window's maximum, a NaN winning (as in the reference); the window's positions in the outer loop, the
    batch in the inner one (a select, which vectorizes)."""
    channels, out_h, out_w, n = y.shape
    for task in numba.prange(channels * out_h):
        c, i = task // out_h, task % out_h
        for j in range(out_w):
            out, first = y[c, i, j], x[c, i * kh, j * kw]
            for k in range(n):
                out[k] = first[k]
            for window in range(1, kh * kw):
                values = x[c, i * kh + window // kw, j * kw + window % kw]
                for k in range(n):
                    v = values[k]
                    out[k] = v if (v > out[k]) | (v != v) else out[k]


@numba.njit(**PARALLEL)
def _backward(dy, x, y, kh, kw, dx):
    """dy to each window's first position holding its maximum (in row-major order; a NaN where the maximum is
    NaN), 0 to the rest: found again from x and y, which is cheaper than keeping the positions."""
    channels, out_h, out_w, n = dy.shape
    zero = dy.dtype.type(0)              # a 0 of dy's dtype: a plain 0 would make the select float64
    for task in numba.prange(channels * out_h):
        c, i = task // out_h, task % out_h
        taken = numpy.empty(n, numpy.bool_)
        for j in range(out_w):
            top, grads = y[c, i, j], dy[c, i, j]
            taken[:] = False
            for window in range(kh * kw):
                r, s = i * kh + window // kw, j * kw + window % kw
                values, out = x[c, r, s], dx[c, r, s]
                for k in range(n):
                    v, m = values[k], top[k]
                    hit = ((v == m) | ((v != v) & (m != m))) & ~taken[k]
                    out[k] = grads[k] if hit else zero
                    taken[k] = taken[k] | hit


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """:func:`tinybn.functional.pooling.max_pool2d_forward` for stride = kernel and no padding; y batch-last."""
    kh, kw = pair(kernel_size, "kernel_size")
    x_last = batch_last(x)
    channels, h, w, n = x_last.shape
    y = numpy.empty((channels, h // kh, w // kw, n), x.dtype)
    run_on_threads()
    _forward(x_last, kh, kw, y)
    return batch_first(y), Cache(x_last=x_last, y=y, kernel=(kh, kw))


def max_pool2d_backward(dy, cache):
    """:func:`tinybn.functional.pooling.max_pool2d_backward`."""
    kh, kw = cache.kernel
    dx = numpy.empty(cache.x_last.shape, dy.dtype)
    run_on_threads()
    _backward(batch_last(dy), cache.x_last, cache.y, kh, kw, dx)
    return (batch_first(dx),)


def _applies(x, kernel_size, stride=None, padding=0):
    kh, kw = pair(kernel_size, "kernel_size")
    return (floats(x) and x.ndim == 4 and pair(padding, "padding") == (0, 0)
            and (stride is None or pair(stride, "stride") == (kh, kw))
            and x.shape[2] % kh == 0 and x.shape[3] % kw == 0)


ops.register_kernel("max_pool2d", "numba", max_pool2d_forward, max_pool2d_backward, applies=_applies)
