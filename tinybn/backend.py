"""The array-module switch: one code path for NumPy (CPU) and CuPy (GPU).

Every piece of math in tinybn starts with ``xp = get_array_module(x)`` and then
calls ``xp.exp``, ``xp.zeros``, ... so the same lines run on either library.
This module is the only place that imports CuPy, and it does so lazily: a CPU
user never pays for (or needs) CuPy.

Device names: ``"cpu"``; ``"gpu"``, ``"cuda"`` and ``"cuda:N"`` for GPU number N.
The default device is ``"cpu"`` unless the ``TINYBN_DEVICE`` environment
variable or :func:`set_default_device` says otherwise.
"""
from __future__ import annotations

import os
import re
import shutil

import numpy

__all__ = [
    "DeviceUnavailableError", "get_array_module", "get_default_device", "set_default_device",
    "resolve_device", "device_of", "to_device", "to_numpy", "register_array_module",
    "cupy_available",
]

_INSTALL_CUPY = (
    "tinybn is not on PyPI: install the GPU extra from your clone of tinybn, in the environment that runs it, "
    "e.g. `.venv/bin/python -m pip install -e '.[cuda12]'` (CuPy for CUDA 12.x, cupy-cuda12x) or "
    "`'.[cuda13]'` (CUDA 13.x, cupy-cuda13x); `nvidia-smi` shows the CUDA version of your driver. "
    "Or run on the CPU with device='cpu' (the default)."
)
_NO_GPU = ("Check that this machine has an NVIDIA GPU and its driver (`nvidia-smi` lists them), or run on the CPU "
           "with device='cpu' (the default).")


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used on this machine."""


_cupy = None  # the imported module, once a GPU was asked for
_extra_modules: dict[str, object] = {}  # device name -> NumPy-compatible module (see register_array_module)
_default_device: str | None = None


def _driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (Linux) or its tool is installed."""
    return os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi") is not None


def _unreachable_gpu_message(error) -> str:
    """What to say when CuPy imports but cannot reach a GPU: no driver (the usual case: a machine without a GPU)
    looks to CUDA like a driver too old for it, so the driver's presence decides which advice is true."""
    said = f"{type(error).__name__}: {error}"
    if not _driver_present():
        return f"A GPU device was requested, but no NVIDIA GPU driver was found on this machine (CUDA said: {said}). {_NO_GPU}"
    return (f"A GPU device was requested, but CuPy cannot reach a GPU ({said}). If the driver is older than CuPy's "
            f"CUDA, install the extra for your driver's CUDA version instead. {_INSTALL_CUPY}")


def _import_cupy():
    """Import CuPy on first use and check that a GPU is really there."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as error:
        raise DeviceUnavailableError(f"A GPU device was requested but CuPy is not installed ({error}). "
                                     f"{_INSTALL_CUPY}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver missing, or older than the CuPy wheel's CUDA
        raise DeviceUnavailableError(_unreachable_gpu_message(error)) from None
    if count == 0:
        raise DeviceUnavailableError(f"A GPU device was requested, but CUDA reports no GPU. {_NO_GPU}")
    _cupy = cupy
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        _import_cupy()
        return True
    except DeviceUnavailableError:
        return False


def register_array_module(name: str, module) -> None:
    """Make ``module`` (a NumPy-compatible array library) usable as device ``name``.

    The module must provide ``asarray`` and the NumPy functions tinybn uses, and its
    arrays must return it from ``__array_namespace__()`` and copy to the host with
    ``.get()``, as CuPy arrays do. tinybn's tests use this for a strict stand-in
    device that refuses to mix with host arrays.
    """
    _extra_modules[name] = module


_CUDA_NAME = re.compile(r"^(gpu|cuda)(:(\d+))?$")


def resolve_device(device=None) -> tuple[str, object]:
    """Turn a device name (or None for the default) into ``(canonical_name, array_module)``.

    >>> resolve_device("cpu")[0]
    'cpu'
    """
    if device is None:
        device = get_default_device()
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'gpu', got {type(device).__name__}")
    name = device.strip().lower()
    if name == "cpu":
        return "cpu", numpy
    if name in _extra_modules:
        return name, _extra_modules[name]
    match = _CUDA_NAME.match(name)
    if match is None:
        known = ", ".join(["'cpu'", "'gpu'", "'cuda'", "'cuda:N'", *map(repr, _extra_modules)])
        raise ValueError(f"Unknown device {device!r}; use one of {known}.")
    cupy = _import_cupy()
    index = int(match.group(3) or 0)
    count = cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        raise DeviceUnavailableError(f"Device {device!r} asked for GPU {index}, but only {count} GPU(s) are present.")
    return f"cuda:{index}", cupy


def get_default_device() -> str:
    """The device used when none is given: ``set_default_device``, else ``$TINYBN_DEVICE``, else ``'cpu'``."""
    if _default_device is not None:
        return _default_device
    return os.environ.get("TINYBN_DEVICE", "cpu") or "cpu"


def set_default_device(device: str | None) -> None:
    """Set the global default device (checked now, so a missing GPU fails here); None restores the default."""
    global _default_device
    _default_device = None if device is None else resolve_device(device)[0]


def get_array_module(*arrays):
    """Return the array module (``numpy``, ``cupy`` or a registered one) of the given arrays.

    Non-array arguments (Python scalars, None) are skipped; with no array at all, NumPy.
    """
    for array in arrays:
        if _cupy is not None and isinstance(array, _cupy.ndarray):
            return _cupy
        if type(array) is numpy.ndarray or isinstance(array, numpy.generic):
            continue
        namespace = getattr(array, "__array_namespace__", None)
        if namespace is not None:
            return namespace()
    return numpy


def device_of(array) -> str:
    """The canonical device name of an array."""
    xp = get_array_module(array)
    if xp is numpy:
        return "cpu"
    for name, module in _extra_modules.items():
        if module is xp:
            return name
    return f"cuda:{array.device.id}"


def to_numpy(array):
    """A host (NumPy) copy or view of ``array``."""
    if isinstance(array, numpy.ndarray) and type(array) is numpy.ndarray:
        return array
    if hasattr(array, "get"):
        return array.get()
    return numpy.asarray(array)


def to_device(array, device=None):
    """Move ``array`` to ``device`` (a no-op when it is already there)."""
    name, xp = resolve_device(device)
    if device_of(array) == name:
        return array
    host = to_numpy(array)
    if xp is numpy:
        return host
    if name.startswith("cuda:"):
        with xp.cuda.Device(int(name.split(":")[1])):
            return xp.asarray(host)
    return xp.asarray(host)
