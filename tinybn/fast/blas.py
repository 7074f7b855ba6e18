"""The thread count of the OpenBLAS library that NumPy has loaded, through ctypes (Linux only).

NumPy has no API for it, and setting ``OPENBLAS_NUM_THREADS`` after NumPy is imported does nothing,
so the library is found in ``/proc/self/maps`` and its own ``openblas_{get,set}_num_threads`` are
called (the names carry a suffix in some builds, e.g. ``scipy_openblas_set_num_threads64_``).
"""
from __future__ import annotations

import ctypes
import functools

_SUFFIXES = ("", "64_")
_PREFIXES = ("openblas_", "scipy_openblas_")


@functools.lru_cache(maxsize=None)
def _function(action: str):
    """``openblas_<action>_num_threads`` of the loaded OpenBLAS, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                function = getattr(library, f"{prefix}{action}_num_threads{suffix}", None)
                if function is not None:
                    return function
    return None


def get_threads() -> int | None:
    """OpenBLAS's current thread count, or None when NumPy does not use OpenBLAS (or it cannot be reached)."""
    function = _function("get")
    return None if function is None else int(function())


def set_threads(count: int) -> bool:
    """Set OpenBLAS's thread count; returns whether it could."""
    function = _function("set")
    if function is None:
        return False
    function(ctypes.c_int(int(count)))
    return True
