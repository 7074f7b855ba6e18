"""Fully-connected (dense) layer.

Forward, for x of shape (N, in) and weight W of shape (out, in)::

    y = x Wᵀ + b                  y: (N, out)

Backward (docs/derivations.md, "Linear")::

    dx = dy W        dW = dyᵀ x        db = Σ_n dy[n]
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
    dweight = dy.T @ cache.x
    dbias = dy.sum(axis=0) if cache.has_bias else None
    return dx, dweight, dbias


ops.define("linear", linear_forward, linear_backward)


def linear(x, weight, bias=None):
    """``y = x @ weight.T + bias`` for x (N, in), weight (out, in), bias (out,)."""
    return apply("linear", x, weight, bias)
