"""The dense layer over batch-last memory: :mod:`tinybn.functional.linear`.

Read the reference first (docs/derivations.md, "Linear"). With the batch last, x is stored as xᵀ (in, N) and y as
yᵀ (out, N), and each product is a sum of rows of N numbers::

    yᵀ[o, :]  = b[o] + Σ_k W[o, k] · xᵀ[k, :]           the threads take outputs o
    dxᵀ[k, :] = Σ_o Wᵀ[k, o] · dyᵀ[o, :]                the same loop, with Wᵀ and no bias
    dW[o, k]  = Σ_n dyᵀ[o, n] · xᵀ[k, n]                db[o] = Σ_n dyᵀ[o, n]

so the family runs without the BLAS that NumPy's ``@`` calls, whose own threads would compete with numba's.
"""
from __future__ import annotations

import numba
import numpy

from .. import ops
from ..autograd import Cache
from ._common import (PARALLEL, TERMS, add_five, batch_first, batch_last, five_rows, floats, padded_columns,
                      row_sums, run_on_threads)


@numba.njit(**PARALLEL)
def _forward(x_t, weight, bias, y_t):
    out_features, in_features = weight.shape
    n = x_t.shape[1]
    for o in numba.prange(out_features):
        total = numpy.empty(n, y_t.dtype)
        total[:] = bias[o]
        for k in range(in_features):
            w, row = weight[o, k], x_t[k]
            for i in range(n):
                total[i] += w * row[i]
        y_t[o, :] = total


@numba.njit(**PARALLEL)
def _weight_gradient(dy_t, x_t, dweight):
    """dW[o, k] += Σ_n dyᵀ[o, n] · xᵀ[k, n], ten at a time: two outputs o times five inputs k, summed over the batch
    in registers, in dy's dtype (``dweight`` zeros, its columns padded to a multiple of five, as in conv2d's weight
    gradient). The threads take pairs of outputs."""
    out_features, n = dy_t.shape
    in_features, columns = x_t.shape[0], dweight.shape[1]
    nothing, zero = numpy.zeros(n, dy_t.dtype), dy_t.dtype.type(0)
    for pair in numba.prange((out_features + 1) // 2):
        o, second = 2 * pair, min(2 * pair + 1, out_features - 1)      # an odd last output is summed twice
        g, h = dy_t[o], dy_t[second]
        for k in range(0, columns, TERMS):
            x0, x1, x2, x3, x4 = five_rows(x_t, k, in_features, nothing)
            a0 = a1 = a2 = a3 = a4 = b0 = b1 = b2 = b3 = b4 = zero
            for i in range(n):
                u, v = g[i], h[i]
                a0 += u * x0[i]; a1 += u * x1[i]; a2 += u * x2[i]; a3 += u * x3[i]; a4 += u * x4[i]  # noqa: E702
                b0 += v * x0[i]; b1 += v * x1[i]; b2 += v * x2[i]; b3 += v * x3[i]; b4 += v * x4[i]  # noqa: E702
            add_five(dweight[o], k, a0, a1, a2, a3, a4)
            if second > o:
                add_five(dweight[second], k, b0, b1, b2, b3, b4)


def linear_forward(x, weight, bias=None):
    """:func:`tinybn.functional.linear.linear_forward` for (N, in) input; y comes back batch-last."""
    x_t = batch_last(x)
    y_t = numpy.empty((weight.shape[0], x.shape[0]), x.dtype)
    weight = numpy.ascontiguousarray(weight)
    run_on_threads()
    _forward(x_t, weight, numpy.zeros(weight.shape[0], x.dtype) if bias is None else bias, y_t)
    return batch_first(y_t), Cache(x_t=x_t, weight=weight, has_bias=bias is not None)


def linear_backward(dy, cache):
    """:func:`tinybn.functional.linear.linear_backward`."""
    dy_t, weight = batch_last(dy), cache.weight
    dweight = numpy.zeros((weight.shape[0], padded_columns(weight.shape[1])), weight.dtype)
    run_on_threads()
    _weight_gradient(dy_t, cache.x_t, dweight)
    dweight = numpy.ascontiguousarray(dweight[:, :weight.shape[1]])
    dbias = None
    if cache.has_bias:                                   # db[o] = Σ_n dyᵀ[o, n], in float64
        dbias = numpy.empty(weight.shape[0])
        row_sums(dy_t, dbias)
        dbias = dbias.astype(dy.dtype)
    dx = None
    if cache.needs(0):
        dx_t = numpy.empty(cache.x_t.shape, dy.dtype)        # the forward's sum, with Wᵀ and no bias
        _forward(dy_t, numpy.ascontiguousarray(weight.T), numpy.zeros(weight.shape[1], dy.dtype), dx_t)
        dx = batch_first(dx_t)
    return dx, dweight, dbias


def _applies(x, weight, bias=None):
    return (floats(*((x, weight) if bias is None else (x, weight, bias))) and x.ndim == 2 and weight.ndim == 2
            and x.shape[1] == weight.shape[1])


ops.register_kernel("linear", "numba", linear_forward, linear_backward, applies=_applies)
