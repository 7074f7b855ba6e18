"""Elementwise activations.

sigmoid:  y = 1 / (1 + e^(−x)),         dx = dy · y · (1 − y)
relu:     y = max(x, 0),                dx = dy · [x > 0]

The sigmoid is evaluated without overflow for any finite x: with e = e^(−|x|) ≤ 1,
y = 1/(1+e) for x ≥ 0 and y = e/(1+e) for x < 0. Both are the same function, but
neither ever exponentiates a large positive number.

What runs is this code, unless a program asks for a kernel family (``tinybn.kernels.use("numba")``, as
``python -m tinybn`` and the examples do): then a compiled kernel of the sigmoid runs instead, on NumPy float32 and
float64 arrays (``tinybn/numba_kernels/activation.py``, tested equal to this code). ``tinybn.kernels.active()`` says which family runs, and
``tinybn.ops.Recorder`` which implementation of which op ran.
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
