"""Fast paths: faster implementations of some ops, used automatically in place of the readable ones.

The readable mathematics lives in :mod:`tinybn.functional` and stays the reference. For a few ops
this package holds a second implementation of the same forward/backward pair, tuned for speed
(:mod:`tinybn.fast.cpu`: batch-last memory, im2col in cache-sized chunks, in-place elementwise
chains), registered in the op registry (:mod:`tinybn.ops`) under the op's name, with the label
``"fast"`` and a test of when it applies. :func:`tinybn.autograd.apply` runs a fast kernel where it
applies and the reference otherwise. The tests check every fast pair equal to its reference.

They are on by default, for library use and on the command line alike: both implementations are held to
the same answers, and a user training a model expects the speed. Switch them off to study or debug the
reference (a student who edits ``tinybn/functional/`` must, to see the edit run)::

    TINYBN_FAST=0 python -m tinybn train ...      # environment variable
    tinybn.fast.set_enabled(False)                 # from Python, or
    with tinybn.fast.disabled(): ...               # for one block

``tinybn.ops.Recorder`` lists which implementation of which op ran, and ``python -m tinybn bench
--profile`` names it per op.

Which ops have a fast path, and when (all on non-empty NumPy float32 or float64 arrays; anything else runs
the reference):

* ``conv2d``: stride 1, any padding;
* ``max_pool2d``: stride equal to the kernel, no padding, height and width divisible by the kernel;
* ``batch_norm``: 4-D input (per-channel statistics), both modes;
* ``sigmoid``: any shape;
* ``linear``: (..., in) input, float32 or float64 (its products then run on tinybn's threads, one OpenBLAS
  thread each, instead of on OpenBLAS's own spinning threads).

The fast paths share their work among ``TINYBN_NUM_THREADS`` threads (default: every core this
process may use), the calling one included; see :mod:`tinybn.fast.parallel`.

Using tinybn changes nothing outside it: NumPy's OpenBLAS is put on one thread only while a fast kernel's
pieces run (its own threads would spin on the cores the kernels' threads need) and gets its thread count
back when they are done; the allocator and NumPy's settings are left alone. A program may ask, on purpose,
for the one process-wide setting that helps, glibc's allocator thresholds, with :func:`tune_process` (the
``tinybn`` command line does, and says so).
"""
from __future__ import annotations

import os

import numpy

from .. import ops
from ..functional._util import pair
from . import cpu, memory, parallel

__all__ = ["disabled", "enabled", "set_enabled", "tune_process"]

LABEL = "fast"
_FALSE = ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether fast kernels are used in the calling thread (default yes; ``TINYBN_FAST=0`` turns them off)."""
    return ops.enabled(LABEL)


def set_enabled(flag: bool) -> None:
    """Use the fast kernels (True) or only the readable reference (False), in every thread from now on
    (a thread inside :func:`disabled` keeps the reference until it leaves)."""
    ops.enable(LABEL, bool(flag))


def disabled():
    """Run a block on the readable reference implementations only, in the calling thread (as ``no_grad()`` does
    for grad mode: other threads keep their own choice)."""
    return ops.enabled_in_thread(LABEL, False)


def tune_process() -> list[str]:
    """Set glibc's allocator thresholds for the whole process, on purpose; returns what changed, one line each.

    ``malloc`` then keeps freed blocks of up to 32 MiB for reuse (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``)
    instead of returning them to the kernel, so a training step stops paying page faults for its big arrays
    whatever the process did before (see :mod:`tinybn.fast.memory`). It cannot be undone. Library code never
    calls this; the ``tinybn`` command line does, and says so.
    """
    if memory.keep_freed_memory():
        return [f"glibc malloc keeps freed blocks up to {memory.MMAP_THRESHOLD >> 20} MiB (mmap threshold) and "
                f"{memory.TRIM_THRESHOLD >> 20} MiB at the top of its heap (trim threshold) for reuse"]
    return []


# ------------------------------------------------------------------ when each kernel applies

_FAST_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def _numpy_floats(*arrays):
    """All NumPy arrays of one dtype, float32 or float64 (float16 statistics need more care than speed:
    the reference computes them in float32), none of them empty (the kernels cut their work into
    pieces of a positive size; the reference handles empty arrays)."""
    dtype = getattr(arrays[0], "dtype", None)
    if dtype not in _FAST_DTYPES:
        return False
    for a in arrays:
        if type(a) is not numpy.ndarray or a.dtype != dtype or a.size == 0:
            return False
    return True


def _conv2d_applies(x, weight, bias=None, stride=1, padding=0):
    arrays = (x, weight) if bias is None else (x, weight, bias)   # (tinybn.functional.conv2d checked the shapes)
    return _numpy_floats(*arrays) and x.ndim == 4 and pair(stride, "stride") == (1, 1)


def _max_pool2d_applies(x, kernel_size, stride=None, padding=0):
    kernel = pair(kernel_size, "kernel_size")
    return (_numpy_floats(x) and x.ndim == 4 and pair(padding, "padding") == (0, 0)
            and (stride is None or pair(stride, "stride") == kernel)
            and x.shape[2] % kernel[0] == 0 and x.shape[3] % kernel[1] == 0)


def _batch_norm_applies(x, gamma, beta, moving_mean, moving_var, training, eps):
    return _numpy_floats(x, gamma, beta, moving_mean, moving_var) and x.ndim == 4


def _sigmoid_applies(x):
    return _numpy_floats(x)


def _linear_applies(x, weight, bias=None):
    arrays = (x, weight) if bias is None else (x, weight, bias)
    return _numpy_floats(*arrays) and x.ndim >= 2 and weight.ndim == 2 and x.shape[-1] == weight.shape[1]


ops.register_kernel("conv2d", LABEL, cpu.conv2d_forward, cpu.conv2d_backward, applies=_conv2d_applies)
ops.register_kernel("max_pool2d", LABEL, cpu.max_pool2d_forward, cpu.max_pool2d_backward,
                    applies=_max_pool2d_applies, wants_recording=True)
ops.register_kernel("batch_norm", LABEL, cpu.batch_norm_forward, cpu.batch_norm_backward,
                    applies=_batch_norm_applies)
ops.register_kernel("sigmoid", LABEL, cpu.sigmoid_forward, cpu.sigmoid_backward, applies=_sigmoid_applies)
ops.register_kernel("linear", LABEL, cpu.linear_forward, cpu.linear_backward, applies=_linear_applies)

set_enabled(os.environ.get("TINYBN_FAST", "1").strip().lower() not in _FALSE)
