"""Elementwise activations.

sigmoid:  y = 1 / (1 + e^(−x)),         dx = dy · y · (1 − y)
relu:     y = max(x, 0),                dx = dy · [x > 0]

The sigmoid is evaluated without overflow for any finite x: with e = e^(−|x|) ≤ 1,
y = 1/(1+e) for x ≥ 0 and y = e/(1+e) for x < 0. Both are the same function, but
neither ever exponentiates a large positive number.

On NumPy float32/float64 arrays, a faster kernel of the sigmoid runs instead of this code (``tinybn/fast/cpu.py``,
tested equal to it). To run this code, switch the kernels off: ``with tinybn.fast.disabled(): ...``,
``tinybn.fast.set_enabled(False)`` or ``TINYBN_FAST=0``; ``tinybn.ops.Recorder`` shows which implementation ran.
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module


def sigmoid_forward(x):
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    y = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return y, Cache(y=y)


def sigmoid_backward(dy, cache):
    y = cache.y
    return (dy * y * (1.0 - y),)


ops.define("sigmoid", sigmoid_forward, sigmoid_backward)


def sigmoid(x):
    """Logistic sigmoid, elementwise; safe from overflow for any finite input."""
    return apply("sigmoid", x)


def relu_forward(x):
    xp = get_array_module(x)
    return xp.maximum(x, 0), Cache(positive=x > 0)


def relu_backward(dy, cache):
    # The derivative at exactly 0 is taken to be 0, as in PyTorch.
    return (dy * cache.positive,)


ops.define("relu", relu_forward, relu_backward)


def relu(x):
    """Rectified linear unit, elementwise."""
    return apply("relu", x)
