"""tinybn: a small, fast deep-learning framework built around batch normalization.

The same code runs on NumPy (CPU, the default) and CuPy (GPU)::

    import tinybn
    from tinybn import nn, functional as F

    x = tinybn.tensor(..., device="cpu")          # or "gpu" / "cuda:0"

The engine: :mod:`tinybn.autograd` (Tensor, the graph, grad mode), :mod:`tinybn.ops` (every op by name, with
its reference and its kernels), :mod:`tinybn.kernels` (which implementation runs: the readable reference unless
you ask), :mod:`tinybn.backend` (NumPy or CuPy), :mod:`tinybn.functional` (the mathematics), :mod:`tinybn.nn`
(layers), :mod:`tinybn.optim`, :mod:`tinybn.gradcheck`. The application on top: :mod:`tinybn.app` (data,
models, trainer, benchmark, CLI).
"""
from . import functional, kernels, nn, ops, optim
from .autograd import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import (DeviceUnavailableError, get_array_module, get_default_device, set_default_device,
                      cupy_available)
from .gradcheck import gradcheck, assert_same
from .random import manual_seed

__version__ = "0.1.0"

__all__ = ["DeviceUnavailableError", "Tensor", "assert_same", "cupy_available", "enable_grad", "functional", "kernels",
           "get_array_module", "get_default_device", "gradcheck", "is_grad_enabled", "manual_seed", "nn", "no_grad",
           "ops", "optim", "set_default_device", "tensor"]
