"""conv2d with stride 1, as direct loops over batch-last memory: the sums of :mod:`tinybn.functional.conv`.

Read the reference first for the mathematics (docs/derivations.md, "Convolution"). In batch-last memory
(:mod:`tinybn.numba_kernels._common`: x̃[c, h, w, :] holds the N examples' values of one position), each of its
three sums is a loop over (c, p, q) or over positions whose innermost loop runs over the batch::

    y[o, i, j, :]       = b[o] + Σ_{c, p, q} W[o, c, p, q] · x̃[c, i + p, j + q, :]
    dW[o, c, p, q]      = Σ_{i, j} Σ_n dy[o, i, j, n] · x̃[c, i + p, j + q, n]
    dx̃[c, r, s, :]      = Σ_{o, p, q: 0 ≤ r − p < H_out, 0 ≤ s − q < W_out} W[o, c, p, q] · dy[o, r − p, s − q, :]

No im2col matrix, kH·kW times the input, is built: each output position sums its window from memory the caches
already hold, for all the channels at once, so that each row of N values is read once per position. The threads
(``numba.prange``) share outputs no two of them write to: positions of y and of dx̃; for dW, pieces of the
positions, each with a partial sum of its own (in float64), added in order.
"""
from __future__ import annotations

import numba
import numpy

from .. import kernels, ops
from ..autograd import Cache
from ..functional._util import pair
from ._common import _LAST, PARALLEL, batch_first, batch_last, floats, run_on_threads


@numba.njit(**PARALLEL)
def _forward(x_pad, weight, bias, y):
    """y[o, i, j, :] = b[o] + Σ_{c,p,q} W[o, c, p, q] · x̃[c, i + p, j + q, :]; one position (i, j) per thread at a
    time, all the output channels together, so that each window row x̃[c, i + p, j + q, :] is read once."""
    c_in, n = x_pad.shape[0], x_pad.shape[3]
    c_out, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    out_h, out_w = y.shape[1], y.shape[2]
    for task in numba.prange(out_h * out_w):
        i, j = task // out_w, task % out_w
        total = numpy.empty((c_out, n), y.dtype)
        for o in range(c_out):
            total[o, :] = bias[o]
        for c in range(c_in):
            for p in range(kh):
                for q in range(kw):
                    values = x_pad[c, i + p, j + q]
                    for o in range(c_out):
                        w, out = weight[o, c, p, q], total[o]
                        for k in range(n):
                            out[k] += w * values[k]
        for o in range(c_out):
            y[o, i, j, :] = total[o]


@numba.njit(**PARALLEL)
def _weight_gradient(x_pad, dy, pieces, dweight):
    """dW[o, c, p, q] = Σ_{i,j} Σ_n dy[o, i, j, n] · x̃[c, i + p, j + q, n]: the positions cut into ``pieces``, one
    per thread at a time, each summing its positions in float64; the pieces added in order at the end."""
    c_in, n = x_pad.shape[0], x_pad.shape[3]
    c_out, out_h, out_w = dy.shape[0], dy.shape[1], dy.shape[2]
    kh, kw = dweight.shape[2], dweight.shape[3]
    positions = out_h * out_w
    partial = numpy.zeros((pieces, c_out, c_in, kh, kw))
    for piece in numba.prange(pieces):
        for position in range(piece * positions // pieces, (piece + 1) * positions // pieces):
            i, j = position // out_w, position % out_w
            for c in range(c_in):
                for p in range(kh):
                    for q in range(kw):
                        values = x_pad[c, i + p, j + q]
                        o = 0
                        while o + 4 <= c_out:      # four output channels at once: each x value loaded once for four
                            g0, g1, g2, g3 = dy[o, i, j], dy[o + 1, i, j], dy[o + 2, i, j], dy[o + 3, i, j]
                            s0 = s1 = s2 = s3 = dy[0, 0, 0, 0] * 0
                            for k in range(n):
                                v = values[k]
                                s0 += g0[k] * v
                                s1 += g1[k] * v
                                s2 += g2[k] * v
                                s3 += g3[k] * v
                            partial[piece, o, c, p, q] += s0
                            partial[piece, o + 1, c, p, q] += s1
                            partial[piece, o + 2, c, p, q] += s2
                            partial[piece, o + 3, c, p, q] += s3
                            o += 4
                        while o < c_out:
                            grads, s = dy[o, i, j], dy[0, 0, 0, 0] * 0
                            for k in range(n):
                                s += grads[k] * values[k]
                            partial[piece, o, c, p, q] += s
                            o += 1
    for o in range(c_out):
        for c in range(c_in):
            for p in range(kh):
                for q in range(kw):
                    s = 0.0
                    for piece in range(pieces):
                        s += partial[piece, o, c, p, q]
                    dweight[o, c, p, q] = s


@numba.njit(**PARALLEL)
def _input_gradient(dy, weight, dx_pad):
    """dx̃[c, r, s, :] = Σ W[o, c, p, q] · dy[o, r − p, s − q, :] over the windows that hold (r, s); one position
    (r, s) per thread at a time, all the input channels together."""
    c_out, out_h, out_w, n = dy.shape
    c_in, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    height, width = dx_pad.shape[1], dx_pad.shape[2]
    for task in numba.prange(height * width):
        r, s = task // width, task % width
        total = numpy.zeros((c_in, n), dy.dtype)
        for o in range(c_out):
            for p in range(max(0, r - out_h + 1), min(kh, r + 1)):
                for q in range(max(0, s - out_w + 1), min(kw, s + 1)):
                    grads = dy[o, r - p, s - q]
                    for c in range(c_in):
                        w, out = weight[o, c, p, q], total[c]
                        for k in range(n):
                            out[k] += w * grads[k]
        for c in range(c_in):
            dx_pad[c, r, s, :] = total[c]


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """:func:`tinybn.functional.conv.conv2d_forward` for stride 1; y comes back batch-last."""
    ph, pw = pair(padding, "padding")
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    if ph or pw:
        x_pad = numpy.zeros((c_in, h + 2 * ph, w + 2 * pw, n), x.dtype)
        x_pad[:, ph:ph + h, pw:pw + w] = x.transpose(_LAST[x.ndim])
    else:
        x_pad = batch_last(x)
    y = numpy.empty((c_out, x_pad.shape[1] - kh + 1, x_pad.shape[2] - kw + 1, n), x.dtype)
    weight = numpy.ascontiguousarray(weight)
    run_on_threads()
    _forward(x_pad, weight, numpy.zeros(c_out, x.dtype) if bias is None else bias, y)
    return batch_first(y), Cache(x_pad=x_pad, weight=weight, has_bias=bias is not None, padding=(ph, pw))


def conv2d_backward(dy, cache):
    """:func:`tinybn.functional.conv.conv2d_backward`: dW always, db with a bias, dx where it is needed."""
    weight, x_pad = cache.weight, cache.x_pad
    dy = batch_last(dy)
    run_on_threads()
    dweight = numpy.empty(weight.shape, weight.dtype)
    _weight_gradient(x_pad, dy, 2 * kernels.threads(), dweight)
    dbias = dy.reshape(dy.shape[0], -1).sum(axis=1) if cache.has_bias else None
    dx = None
    if cache.needs(0):                  # the first layer's input is data: skip the most expensive sum
        dx_pad = numpy.empty(x_pad.shape, dy.dtype)
        _input_gradient(dy, weight, dx_pad)
        (ph, pw), (_, h, w, _) = cache.padding, x_pad.shape
        dx = batch_first(dx_pad[:, ph:h - ph, pw:w - pw])
    return dx, dweight, dbias


def _applies(x, weight, bias=None, stride=1, padding=0):
    return (floats(*((x, weight) if bias is None else (x, weight, bias))) and x.ndim == 4
            and pair(stride, "stride") == (1, 1))


ops.register_kernel("conv2d", "numba", conv2d_forward, conv2d_backward, applies=_applies)
