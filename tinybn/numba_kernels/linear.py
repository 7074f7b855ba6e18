"""The dense layer over batch-last memory: :mod:`tinybn.functional.linear`.

Read the reference first (docs/derivations.md, "Linear"). With the batch last, x is stored as xᵀ (in, N) and y as
yᵀ (out, N), and each product is a sum of rows of N numbers::

    yᵀ[o, :]  = b[o] + Σ_k W[o, k] · xᵀ[k, :]           the threads take outputs o
    dxᵀ[k, :] = Σ_o Wᵀ[k, o] · dyᵀ[o, :]                the same loop, with Wᵀ and no bias
    dW[o, :]  = Σ_n dyᵀ[o, n] · x[n, :]                 db[o] = Σ_n dyᵀ[o, n]

so the family runs without the BLAS that NumPy's ``@`` calls, whose own threads would compete with numba's.
"""
from __future__ import annotations

import numba
import numpy

from .. import ops
from ..autograd import Cache
from ._common import PARALLEL, batch_first, batch_last, floats, run_on_threads


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
def _weight_gradient(dy_t, x_rows, dweight, dbias):
    """dW[o, :] = Σ_n dyᵀ[o, n] · x[n, :], as rows added (no dot product to sum across a vector at the end, which
    took twice as long), and db[o] = Σ_n dyᵀ[o, n]; the threads take outputs o."""
    out_features, in_features = dweight.shape
    n = dy_t.shape[1]
    for o in numba.prange(out_features):
        total, bias = numpy.zeros(in_features, dweight.dtype), 0.0
        for i in range(n):
            g, row = dy_t[o, i], x_rows[i]
            bias += g
            for k in range(in_features):
                total[k] += g * row[k]
        dweight[o, :] = total
        dbias[o] = bias


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
    dweight, dbias = numpy.empty(weight.shape, weight.dtype), numpy.empty(weight.shape[0])
    run_on_threads()
    _weight_gradient(dy_t, numpy.ascontiguousarray(cache.x_t.T), dweight, dbias)
    dx = None
    if cache.needs(0):
        dx_t = numpy.empty(cache.x_t.shape, dy.dtype)        # the forward's sum, with Wᵀ and no bias
        _forward(dy_t, numpy.ascontiguousarray(weight.T), numpy.zeros(weight.shape[1], dy.dtype), dx_t)
        dx = batch_first(dx_t)
    return dx, dweight, dbias.astype(dy.dtype) if cache.has_bias else None


def _applies(x, weight, bias=None):
    return (floats(*((x, weight) if bias is None else (x, weight, bias))) and x.ndim == 2 and weight.ndim == 2
            and x.shape[1] == weight.shape[1])


ops.register_kernel("linear", "numba", linear_forward, linear_backward, applies=_applies)
