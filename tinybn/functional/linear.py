"""Fully-connected (dense) layer.

Forward, for x of shape (N, in) and weight W of shape (out, in)::

    y = x Wᵀ + b                  y: (N, out)

Backward (docs/derivations.md, "Linear")::

    dx = dy W        dW = dyᵀ x        db = Σ_n dy[n]

As in PyTorch, x may have more leading axes, (..., in): every row of every leading index is a sample,
and dW, db sum over all of them.

What runs is this code, unless a program asks for a kernel family (``tinybn.kernels.use("numba")``, as
``python -m tinybn`` and the examples do): then a compiled kernel of the op ((N, in) input) runs instead, on NumPy float32 and
float64 arrays (``tinybn/numba_kernels/linear.py``, tested equal to this code). ``tinybn.kernels.active()`` says which family runs, and
``tinybn.ops.Recorder`` which implementation of which op ran.
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, apply


def linear_forward(x, weight, bias=None):
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y, Cache(x=x, weight=weight, has_bias=bias is not None)


def linear_backward(dy, cache):
    dx = dy @ cache.weight
    rows_dy, rows_x = dy.reshape(-1, dy.shape[-1]), cache.x.reshape(-1, cache.x.shape[-1])   # (..., k) -> (rows, k)
    dweight = rows_dy.T @ rows_x
    dbias = rows_dy.sum(axis=0) if cache.has_bias else None
    return dx, dweight, dbias


ops.define("linear", linear_forward, linear_backward)


def linear(x, weight, bias=None):
    """``y = x @ weight.T + bias`` for x (..., in), weight (out, in), bias (out,)."""
    if len(x.shape) < 1 or len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear expects x of shape (..., in) and a weight of shape (out, in), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    return apply("linear", x, weight, bias)
