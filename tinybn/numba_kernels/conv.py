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
from ._common import (_LAST, PARALLEL, TERMS, add_five, batch_first, batch_last, five_rows, floats,
                      padded_columns, row_sums, run_on_threads)


@numba.njit(**PARALLEL)
def _forward(x_pad, weight, bias, y):
    """y[o, i, j, :] = b[o] + Σ_{c,p,q} W[o, c, p, q] · x̃[c, i + p, j + q, :]; one position (i, j) per thread at a
    time, all the output channels together.

    The sum over q runs five columns at a time, for two output channels at a time: each of the two rows of y gets
    w₀·x₀ + … + w₄·x₄ in one pass, instead of a pass per term (each pass reads and writes y's row; five rows of x̃
    are read for the price of one, and serve two outputs). ``weight`` and ``bias`` come padded with zeros: the
    columns to a multiple of five, the output channels to an even number (the padded channel's sums are left out of
    y); the rows past the window are rows of zeros."""
    c_in, n = x_pad.shape[0], x_pad.shape[3]
    channels, kh, columns = weight.shape[0], weight.shape[2], weight.shape[3]
    c_out, out_h, out_w = y.shape[0], y.shape[1], y.shape[2]
    kw = x_pad.shape[2] - out_w + 1
    nothing = numpy.zeros(n, y.dtype)
    for task in numba.prange(out_h * out_w):
        i, j = task // out_w, task % out_w
        total = numpy.empty((channels, n), y.dtype)
        for o in range(channels):
            total[o, :] = bias[o]
        for c in range(c_in):
            for p in range(kh):
                for q in range(0, columns, TERMS):
                    x0, x1, x2, x3, x4 = five_rows(x_pad[c, i + p], j + q, j + kw, nothing)
                    for o in range(0, channels, 2):
                        w, v, out, other = weight[o, c, p], weight[o + 1, c, p], total[o], total[o + 1]
                        w0, w1, w2, w3, w4 = w[q], w[q + 1], w[q + 2], w[q + 3], w[q + 4]
                        v0, v1, v2, v3, v4 = v[q], v[q + 1], v[q + 2], v[q + 3], v[q + 4]
                        for k in range(n):
                            a, b, c_, d, e = x0[k], x1[k], x2[k], x3[k], x4[k]
                            out[k] += w0 * a + w1 * b + w2 * c_ + w3 * d + w4 * e
                            other[k] += v0 * a + v1 * b + v2 * c_ + v3 * d + v4 * e
        for o in range(c_out):
            y[o, i, j, :] = total[o]


@numba.njit(**PARALLEL)
def _weight_gradient(x_pad, dy, pieces, dweight):
    """dW[o, c, p, q] = Σ_{i,j} Σ_n dy[o, i, j, n] · x̃[c, i + p, j + q, n]: the positions cut into ``pieces``, one
    per thread at a time, each with partial sums of its own in float64, added in order at the end.

    Within a position, ten sums over the batch run together, in ten registers: two output channels times five
    columns q, so that each number of dy and x̃ loaded serves two to five of them. ``dweight``'s columns are
    padded to a multiple of five (the padded ones, sums against rows of zeros, are left out by the caller)."""
    c_in, n = x_pad.shape[0], x_pad.shape[3]
    c_out, out_h, out_w = dy.shape[0], dy.shape[1], dy.shape[2]
    kh, columns = dweight.shape[2], dweight.shape[3]
    kw = x_pad.shape[2] - out_w + 1
    positions = out_h * out_w
    partial = numpy.zeros((pieces, c_out, c_in, kh, columns))
    nothing, zero = numpy.zeros(n, dy.dtype), dy.dtype.type(0)   # the batch summed in dy's dtype, vectorized
    for piece in numba.prange(pieces):
        for position in range(piece * positions // pieces, (piece + 1) * positions // pieces):
            i, j = position // out_w, position % out_w
            for c in range(c_in):
                for p in range(kh):
                    for q in range(0, columns, TERMS):
                        x0, x1, x2, x3, x4 = five_rows(x_pad[c, i + p], j + q, j + kw, nothing)
                        for o in range(0, c_out, 2):
                            second = min(o + 1, c_out - 1)        # an odd last channel is summed twice
                            g, h = dy[o, i, j], dy[second, i, j]
                            a0 = a1 = a2 = a3 = a4 = b0 = b1 = b2 = b3 = b4 = zero
                            for k in range(n):
                                u, v = g[k], h[k]
                                a0 += u * x0[k]; a1 += u * x1[k]; a2 += u * x2[k]; a3 += u * x3[k]  # noqa: E702
                                b0 += v * x0[k]; b1 += v * x1[k]; b2 += v * x2[k]; b3 += v * x3[k]  # noqa: E702
                                a4 += u * x4[k]; b4 += v * x4[k]  # noqa: E702
                            add_five(partial[piece, o, c, p], q, a0, a1, a2, a3, a4)
                            if second > o:
                                add_five(partial[piece, second, c, p], q, b0, b1, b2, b3, b4)
    for o in range(c_out):
        for c in range(c_in):
            for p in range(kh):
                for q in range(columns):
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
    channels = c_out + c_out % 2                 # an even number of output channels, for the forward's pairs
    padded = numpy.zeros((channels,) + weight.shape[1:3] + (padded_columns(kw),), weight.dtype)
    padded[:c_out, :, :, :kw] = weight
    padded_bias = numpy.zeros(channels, x.dtype)
    if bias is not None:
        padded_bias[:c_out] = bias
    run_on_threads()
    _forward(x_pad, padded, padded_bias, y)
    return batch_first(y), Cache(x_pad=x_pad, weight=weight, has_bias=bias is not None, padding=(ph, pw))


def conv2d_backward(dy, cache):
    """:func:`tinybn.functional.conv.conv2d_backward`: dW always, db with a bias, dx where it is needed."""
    weight, x_pad = cache.weight, cache.x_pad
    dy = batch_last(dy)
    run_on_threads()
    kw = weight.shape[3]
    dweight = numpy.empty(weight.shape[:3] + (padded_columns(kw),), weight.dtype)
    _weight_gradient(x_pad, dy, 2 * kernels.threads(), dweight)
    dweight = numpy.ascontiguousarray(dweight[..., :kw])
    dbias = None
    if cache.has_bias:
        dbias = numpy.empty(dy.shape[0])
        row_sums(dy.reshape(dy.shape[0], -1), dbias)
        dbias = dbias.astype(dy.dtype)
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
