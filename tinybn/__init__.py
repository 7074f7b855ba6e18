"""tinybn: a small, fast deep-learning framework built around batch normalization.

The same code runs on NumPy (CPU, the default) and CuPy (GPU)::

    import tinybn
    from tinybn import nn, functional as F

    x = tinybn.tensor(..., device="cpu")          # or "gpu" / "cuda:0"
"""
from . import data, fast, functional, models, nn, optim
from .backend import (DeviceUnavailableError, get_array_module, get_default_device, set_default_device,
                      cupy_available)
from .gradcheck import gradcheck, assert_same
from .random import manual_seed
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor

__version__ = "0.1.0"

__all__ = ["DeviceUnavailableError", "Tensor", "assert_same", "cupy_available", "enable_grad", "functional",
           "get_array_module", "get_default_device", "gradcheck", "is_grad_enabled", "manual_seed", "nn", "no_grad",
           "set_default_device", "tensor"]
