"""Helpers for the property-based suites (test_properties_*.py): the budget, memory layouts, comparisons.

Hypothesis draws shapes and parameters; the values come from a NumPy generator seeded by a drawn
integer (continuous values: no ties for max pooling, no exact zeros for ReLU), so a failure shrinks to
small shapes and is replayed from its seed.

Budget: CI runs each property a fixed, derandomized number of times. ``TINYBN_EXPLORE=20`` runs 20 times as
many random examples (a new random seed each run); a failure it finds prints an ``@example`` row to
paste into the test, so that it stays in the fixed suite.
"""
from __future__ import annotations

import os

import numpy
from hypothesis import HealthCheck, settings

EXPLORE = int(os.environ.get("TINYBN_EXPLORE", "0") or 0)

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("explore" if EXPLORE else "ci")


def budget(examples: int) -> settings:
    """``@budget(n)``: n examples in CI, n·TINYBN_EXPLORE when exploring."""
    return settings(max_examples=examples * max(1, EXPLORE))


# ------------------------------------------------------------------------------------------- layouts

LAYOUTS = ("contiguous", "channels_last", "batch_last", "fortran", "sliced", "reversed", "size1_strides")


def with_layout(values: numpy.ndarray, layout: str) -> numpy.ndarray:
    """The same values stored in ``layout``, returned as the very array to hand to an op (no later copy).

    * ``contiguous``: C order;
    * ``channels_last`` / ``batch_last``: axis 1 / axis 0 stored last (NHWC / CHWN for 4-D arrays);
    * ``fortran``: Fortran order (every axis reversed in memory);
    * ``sliced``: every other element of a larger buffer, from an offset (strides twice the dense ones);
    * ``reversed``: negative strides on every axis;
    * ``size1_strides``: C order, but every axis of size 1 carries a stride that no dense array has
      (NumPy still calls such an array contiguous, and the stride must never be followed).

    Each construction checks the strides it promises, so a test knows the layout reaches the op.
    """
    values = numpy.asarray(values)
    ndim, item = values.ndim, values.itemsize
    if ndim == 0:
        return values.copy()
    if layout == "contiguous":
        out = numpy.ascontiguousarray(values)
        expected = _dense_strides(values.shape, item)
    elif layout in ("channels_last", "batch_last") and ndim >= 2:
        moved = 1 if layout == "channels_last" else 0
        order = [a for a in range(ndim) if a != moved] + [moved]          # storage order, slowest first
        storage = numpy.ascontiguousarray(values.transpose(order))
        out = storage.transpose(numpy.argsort(order))
        dense = _dense_strides(storage.shape, item)
        expected = tuple(dense[order.index(a)] for a in range(ndim))
    elif layout == "fortran" or (layout in ("channels_last", "batch_last") and ndim < 2):
        out = numpy.asfortranarray(values)
        expected = _dense_strides(values.shape[::-1], item)[::-1]
    elif layout == "sliced":
        big = numpy.zeros(tuple(2 * n + 1 for n in values.shape), values.dtype)
        out = big[tuple(slice(1, 1 + 2 * n, 2) for n in values.shape)]
        out[...] = values
        expected = tuple(2 * s for s in _dense_strides(big.shape, item))
    elif layout == "reversed":
        flipped = tuple(slice(None, None, -1) for _ in values.shape)
        storage = numpy.ascontiguousarray(values[flipped])
        out = storage[flipped]
        expected = tuple(-s for s in _dense_strides(values.shape, item))
    elif layout == "size1_strides":
        dense = numpy.ascontiguousarray(values)
        expected = tuple(item * 7919 if n == 1 else s for s, n in zip(_dense_strides(values.shape, item), values.shape))
        out = numpy.lib.stride_tricks.as_strided(dense, values.shape, expected)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    assert _same_strides(out, expected, exact=layout == "size1_strides"), (layout, out.strides, expected)
    numpy.testing.assert_array_equal(out, values)
    return out


def _same_strides(array, expected, exact):
    """Strides as promised; NumPy keeps whatever stride it likes on an axis of length 0 or 1, so those
    axes count only where the layout sets them itself."""
    if array.size == 0:
        return True
    return all(s == e for s, e, n in zip(array.strides, expected, array.shape) if exact or n > 1)


def _dense_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ------------------------------------------------------------------------------------------- comparing


def assert_close(what, actual, expected, rtol=1e-9, atol=1e-9):
    """Close relative to the size of the expected values; the message names what differs and where."""
    actual, expected = numpy.asarray(actual, numpy.float64), numpy.asarray(expected, numpy.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = max(1.0, float(numpy.abs(expected).max())) if expected.size else 1.0
    numpy.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)
