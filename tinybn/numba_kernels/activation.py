"""The sigmoid, elementwise, in whatever memory order its input has: :mod:`tinybn.functional.activation`.

Read the reference first. With e = e^(−|x|) ≤ 1, y = 1/(1 + e) for x ≥ 0 and y = e/(1 + e) for x < 0 (no overflow
for any x), and dx = dy · y · (1 − y). The output keeps the input's layout (batch-last stays batch-last), and the
loop runs over the numbers in memory order, shared among the threads.

In float32 the exponential is computed here, not by ``math.exp``: a call into the C library for each number could
not be vectorized, and took most of the sigmoid's time (2.6 ns a number against 0.35 ns for the whole sigmoid below,
on one core of the machine in docs/benchmarks.md). For t = −|x| ≤ 0, with n = round(t / ln 2) and r = t − n·ln 2,
so that |r| ≤ ln 2 / 2::

    e^t = 2^n · e^r,    e^r = 1 + r + r²/2! + … + r⁷/7!   (the first term left out, r⁸/8!, is below 5.5e-9)

r is formed in two steps (Cody and Waite): ln 2 = LN2_HIGH + LN2_LOW, where LN2_HIGH has so few bits that n·LN2_HIGH is
exact, and 2^n is built from its bits: the exponent field of a float32 holds n + 127. The result is within two
units in the last place of the correctly rounded sigmoid. Where t < −87 (a margin above −87.3, where 2^n would leave
float32's normal numbers) or x is NaN, that number alone is computed again by the reference's formula, in float32,
with ``math.exp``: each number's sigmoid depends on that number only.
"""
from __future__ import annotations

import math

import numba
import numpy

from .. import ops
from ..autograd import Cache
from ._common import JIT, PARALLEL, floats, run_on_threads

F32 = numpy.float32
LOG2E, LN2_HIGH, LN2_LOW = F32(1 / math.log(2)), F32(0.693359375), F32(math.log(2) - 0.693359375)
TAYLOR = tuple(F32(1 / math.factorial(k)) for k in range(8))            # 1/0!, 1/1!, ..., 1/7!
ZERO, HALF, ONE, LOWEST = F32(0), F32(0.5), F32(1), F32(-87)
CHUNK = 4096                                                             # numbers per task of a thread
EXACT = dict(PARALLEL, fastmath={"contract"})       # no reassociation: it could undo the two-step r


@numba.njit(**JIT)
def _in_range(v):
    """Whether the float32 kernel's exponential covers v: −|v| ≥ LOWEST (False for NaN)."""
    return -abs(v) >= LOWEST


@numba.njit(**JIT)
def _exact(v):
    """The reference's formula for one number, in its dtype, with ``math.exp``."""
    one = type(v)(1)                     # 1 in v's dtype: a plain 1.0 would make float32 arithmetic float64
    e = math.exp(-abs(v))
    return (one if v >= 0 else e) / (one + e)


@numba.njit(**PARALLEL)
def _forward(x, y):
    """The sigmoid in float64: the reference's formula, number by number, shared among the threads."""
    for k in numba.prange(x.size):
        y[k] = _exact(x[k])


@numba.njit(**EXACT)
def _forward_float32(x, y):
    """The sigmoid of float32 numbers with the exponential above; one chunk of numbers per thread at a time."""
    c0, c1, c2, c3, c4, c5, c6, c7 = TAYLOR
    for chunk in numba.prange((x.size + CHUNK - 1) // CHUNK):
        xs, ys = x[chunk * CHUNK:(chunk + 1) * CHUNK], y[chunk * CHUNK:(chunk + 1) * CHUNK]
        bits = numpy.empty(xs.size, numpy.int32)          # the bits of 2^n
        outside = 0
        for i in range(xs.size):                          # indices from 0, which the compiler knows are not negative
            inside = _in_range(xs[i])
            outside += not inside
            t = -abs(xs[i]) if inside else LOWEST
            n = numpy.floor(t * LOG2E + HALF)
            r = (t - n * LN2_HIGH) - n * LN2_LOW
            bits[i] = (numpy.int32(n) + 127) << 23
            ys[i] = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0     # e^r
        two_n = bits.view(numpy.float32)
        for i in range(xs.size):
            e = ys[i] * two_n[i]
            ys[i] = (ONE if xs[i] >= ZERO else e) / (ONE + e)
        if outside:                                       # rare: those numbers again, by the reference's formula
            _redo_outside(xs, ys)


@numba.njit(**JIT)
def _redo_outside(xs, ys):
    """ys[i] = the reference's sigmoid of xs[i] where −|xs[i]| < LOWEST or xs[i] is NaN; blocks of 64 numbers with
    none of them are passed over after one count, which vectorizes (a scan of them all, one by one, did not)."""
    for block in range(0, xs.size, 64):
        x, y = xs[block:block + 64], ys[block:block + 64]
        count = 0
        for i in range(x.size):
            count += not _in_range(x[i])
        if count:
            for i in range(x.size):
                if not _in_range(x[i]):
                    y[i] = _exact(x[i])


@numba.njit(**PARALLEL)
def _backward(dy, y, dx):
    one = y.dtype.type(1)                # in y's dtype: a plain 1.0 would make float32 arithmetic float64
    for k in numba.prange(y.size):
        dx[k] = dy[k] * y[k] * (one - y[k])


def _flat(array):
    """The 1-D view of a dense array's numbers in memory order (a copy for a strided slice)."""
    return array.ravel(order="K")


def sigmoid_forward(x):
    """:func:`tinybn.functional.activation.sigmoid_forward`."""
    y = numpy.empty_like(x)                      # dense, in x's memory order
    run_on_threads()
    (_forward_float32 if x.dtype == numpy.float32 else _forward)(_flat(x), _flat(y))
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
