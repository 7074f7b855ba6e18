"""Layers: each holds its parameters, checks its input, and calls the math in tinybn.functional."""
from __future__ import annotations

import math

import numpy

from .. import backend
from .. import functional as F
from ..functional._util import pair
from ..autograd import Tensor
from . import init
from .module import Module, Parameter


def check_input(layer: Module, x, ndim: int, layout: str, channels: int | None = None, dtype=None) -> None:
    """Raise a ValueError naming the layer, the expected shape and the shape received (and, given ``dtype``, the
    dtype its weights have: as in PyTorch, a float32 layer does not silently compute in float64)."""
    data = x.data if isinstance(x, Tensor) else x
    shape = tuple(getattr(data, "shape", ()))
    expected = layout if channels is None else layout.replace("C", str(channels), 1)
    if getattr(data, "ndim", None) != ndim:
        raise ValueError(f"{layer!r} expects a {ndim}-D input of shape {expected}, got shape {shape}")
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{layer!r} expects {channels} channels/features on axis 1 ({expected}), "
                         f"got shape {shape}")
    if data.dtype.kind != "f":
        raise ValueError(f"{layer!r} expects a floating-point input, got dtype {data.dtype}; "
                         f"convert it first, e.g. x.astype('float32')")
    if dtype is not None and data.dtype != dtype:
        raise ValueError(f"{layer!r} has {dtype} weights but got a {data.dtype} input; cast the input "
                         f"(x.astype('{dtype}')) or the model (model.to(dtype='{data.dtype}'))")


def check_size(layer: str, name: str, value, minimum: int = 1, allow_pair: bool = False):
    """Raise a ValueError naming the layer and the argument unless ``value`` is a whole number of at least
    ``minimum`` (or, with ``allow_pair``, a pair of them); checked when the layer is built, not at its first call."""
    values = (value,)
    if isinstance(value, (tuple, list)):
        values = tuple(value) if allow_pair and len(value) == 2 else (None,)
    if not all(isinstance(v, (int, numpy.integer)) and not isinstance(v, bool) and v >= minimum for v in values):
        what = "a whole number" + (" (or a pair of them)" if allow_pair else "") + f" of at least {minimum}"
        raise ValueError(f"{layer}: {name} must be {what}, got {value!r}")
    return value


def _new_parameter(value: numpy.ndarray, device) -> Parameter:
    return Parameter(backend.to_device(value, device))


class Linear(Module):
    """``y = x Wᵀ + b`` with W of shape (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=numpy.float32):
        super().__init__()
        check_size("Linear", "in_features", in_features)
        check_size("Linear", "out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _new_parameter(init.uniform((out_features, in_features), bound, dtype), device)
        self.register_parameter("bias", _new_parameter(init.uniform((out_features,), bound, dtype), device) if bias else None)

    def forward(self, x):
        check_input(self, x, 2, "(N, C)", self.in_features, self.weight.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution, weight (out_channels, in_channels, kH, kW); see :func:`tinybn.functional.conv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 device=None, dtype=numpy.float32):
        super().__init__()
        for name, value, minimum in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1)):
            check_size("Conv2d", name, value, minimum)
        for name, value, minimum in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            check_size("Conv2d", name, value, minimum, allow_pair=True)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = pair(kernel_size, "kernel_size"), stride, padding
        shape = (out_channels, in_channels, *self.kernel_size)
        bound = 1.0 / math.sqrt(init.fans(shape)[0])
        self.weight = _new_parameter(init.uniform(shape, bound, dtype), device)
        self.register_parameter("bias", _new_parameter(init.uniform((out_channels,), bound, dtype), device) if bias else None)

    def forward(self, x):
        check_input(self, x, 4, "(N, C, H, W)", self.in_channels, self.weight.dtype)
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


class _Pool2d(Module):
    function = None

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        layer = type(self).__name__
        check_size(layer, "kernel_size", kernel_size, 1, allow_pair=True)
        if stride is not None:
            check_size(layer, "stride", stride, 1, allow_pair=True)
        check_size(layer, "padding", padding, 0, allow_pair=True)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        check_input(self, x, 4, "(N, C, H, W)")
        return type(self).function(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max pooling; the stride defaults to the kernel size."""
    function = staticmethod(F.max_pool2d)


class AvgPool2d(_Pool2d):
    """Average pooling; the stride defaults to the kernel size."""
    function = staticmethod(F.avg_pool2d)


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class Flatten(Module):
    """(N, ...) -> (N, -1)."""

    def forward(self, x):
        return F.flatten(x)


class Dropout(Module):
    """Inverted dropout with drop probability ``p``; the identity in eval mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class CrossEntropyLoss(Module):
    """Mean softmax cross-entropy of logits (N, K) against integer labels (N,)."""

    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels)
