"""A strict stand-in for CuPy, so CI catches host/device mixing without a GPU.

The typical NumPy/CuPy bug is an array made with ``numpy`` inside code that otherwise works on
``xp`` arrays: ``numpy.zeros(...)`` or ``numpy.arange(...)`` next to a device array. NumPy
silently accepts that on the CPU and CuPy rejects it on the GPU, so CPU-only CI never sees it.

``strict`` (registered as the device ``"strict"``) behaves like CuPy in the ways that matter:

* its arrays are :class:`StrictArray` (an ndarray subclass), made only by ``strict.<function>``;
* any ufunc or NumPy function that meets a plain ``numpy.ndarray`` next to a StrictArray raises
  ``TypeError`` (Python and NumPy scalars are allowed, as in CuPy);
* calling a ``numpy.<function>`` directly on a StrictArray raises too: device code must go
  through ``xp``;
* ``.get()`` copies to the host, as CuPy's does.
"""
from __future__ import annotations

import types

import numpy


class MixedDeviceError(TypeError):
    pass


def _is_host_array(value):
    return type(value) is numpy.ndarray


def _check_no_host_arrays(values, what):
    for value in values:
        if isinstance(value, (list, tuple)):
            _check_no_host_arrays(value, what)
        elif _is_host_array(value):
            raise MixedDeviceError(f"{what}: a host numpy.ndarray of shape {value.shape} met a device (strict) array; "
                                   f"create it with xp, not numpy")


def _unwrap(value):
    if isinstance(value, StrictArray):
        return value.view(numpy.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


def _wrap(value):
    if type(value) is numpy.ndarray:
        return value.view(StrictArray)
    if isinstance(value, numpy.generic):  # CuPy gives 0-d device arrays where NumPy gives scalars
        return numpy.asarray(value).view(StrictArray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, numpy.random.Generator):
        return _StrictGenerator(value)
    return value


class StrictArray(numpy.ndarray):
    """A 'device' array: refuses to mix with host arrays."""

    def __array_namespace__(self, api_version=None):
        return strict

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _check_no_host_arrays(inputs, f"numpy.{ufunc.__name__}")
        _check_no_host_arrays(kwargs.get("out", ()), f"numpy.{ufunc.__name__}(out=...)")
        result = getattr(ufunc, method)(*_unwrap(inputs), **{k: _unwrap(v) for k, v in kwargs.items()})
        if method == "at":
            return None
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        raise MixedDeviceError(f"numpy.{func.__name__} was called on a device (strict) array; "
                               f"use xp.{func.__name__} with xp = get_array_module(...)")

    def __getitem__(self, index):
        return _wrap(super().__getitem__(index))

    def get(self):
        """Copy to the host, as cupy.ndarray.get() does."""
        return numpy.array(self.view(numpy.ndarray), copy=True)

    def __repr__(self):
        return "strict." + repr(self.view(numpy.ndarray))


_TRANSFERS = {"asarray", "array"}  # explicit host-to-device copies, as cupy.asarray(numpy_array)


def _strict_function(function, name):
    def call(*args, **kwargs):
        if name not in _TRANSFERS:
            _check_no_host_arrays(args, f"strict.{name}")
            _check_no_host_arrays(kwargs.values(), f"strict.{name}")
        return _wrap(function(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    call.__name__ = name
    return call


class _StrictGenerator:
    def __init__(self, generator):
        self._generator = generator

    def __getattr__(self, name):
        return _strict_function(getattr(self._generator, name), name)


class _StrictNamespace(types.ModuleType):
    """Forwards ``strict.X`` to ``numpy.X``, returning StrictArrays and refusing host arrays as inputs."""

    def __init__(self, name, target):
        super().__init__(name)
        self._target = target

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if isinstance(value, types.ModuleType):
            return _StrictNamespace(f"{self.__name__}.{name}", value)
        if isinstance(value, numpy.ufunc):
            return _StrictUfunc(value)
        if callable(value) and not isinstance(value, type):
            return _strict_function(value, name)
        return value  # constants (inf, pi), dtypes and classes


class _StrictUfunc:
    """xp.add.at(...), xp.maximum(...): ufuncs with their methods, all strict."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return _strict_function(self._ufunc, self._ufunc.__name__)(*args, **kwargs)

    def __getattr__(self, name):
        method = getattr(self._ufunc, name)
        if name == "at":
            def at(target, *args):
                _check_no_host_arrays(args, f"strict.{self._ufunc.__name__}.at")
                method(target.view(numpy.ndarray), *_unwrap(args))
            return at
        return _strict_function(method, f"{self._ufunc.__name__}.{name}")


strict = _StrictNamespace("strict", numpy)
strict.ndarray = StrictArray
