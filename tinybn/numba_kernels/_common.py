"""What the numba kernels share: batch-last memory, when a kernel applies, threads, and the compile options.

**Batch-last memory.** Every kernel of this family keeps its arrays with the batch axis last in memory: an
(N, C, H, W) tensor is stored as a C-contiguous (C, H, W, N) array and handed back as the (N, C, H, W) view
``array.transpose(3, 0, 1, 2)``; an (N, F) one as (F, N) and its transpose. Shapes and values are the usual ones,
only the strides differ. Then every innermost loop runs over the N examples of the batch, contiguous in memory:
long, and the same for every op, so the compiler vectorizes it. A kernel that receives another layout copies it
into this one first (:func:`batch_last`); the next kernel takes its input without a copy.
"""
from __future__ import annotations

import threading

import numba
import numpy

from .. import kernels

# Reductions may be reordered (so that they vectorize) and a·b + c fused. The flags that let the compiler assume
# there are no NaNs, infinities or signed zeros stay off; a reordered sum still rounds differently, and in float32
# can overflow where another order would not (as the reference's BLAS may). The tests hold every kernel to the
# reference within the rounding this allows.
# A division by zero gives inf or nan, as in NumPy, instead of raising ZeroDivisionError as Python does: the check
# Python's rule needs, a branch before every division, kept loops with a division from being vectorized.
FASTMATH = {"reassoc", "contract"}
JIT = dict(cache=True, fastmath=FASTMATH, error_model="numpy")
PARALLEL = dict(JIT, parallel=True)

FLOATS = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def floats(*arrays) -> bool:
    """Every array a NumPy array of one dtype, float32 or float64, and none empty (the reference handles the rest:
    other dtypes, float16's float32 statistics, CuPy, empty batches)."""
    dtype = getattr(arrays[0], "dtype", None)
    return dtype in FLOATS and all(type(a) is numpy.ndarray and a.dtype == dtype and a.size for a in arrays)


_LAST = [None, (0,), (1, 0), (1, 2, 0), (1, 2, 3, 0)]     # the batch axis moved last, by ndim
_FIRST = [None, (0,), (1, 0), (2, 0, 1), (3, 0, 1, 2)]               # and back


def batch_last(x):
    """x (N, ...) as a C-contiguous array (..., N): a view when x came from a kernel of this family, else a copy."""
    moved = x.transpose(_LAST[x.ndim])
    return moved if moved.flags.c_contiguous else numpy.ascontiguousarray(moved)


def batch_first(array):
    """The (N, ...) view of a batch-last array (..., N)."""
    return array.transpose(_FIRST[array.ndim])


_threads = threading.local()      # .count: what this thread last gave numba


def run_on_threads() -> None:
    """Give this thread's next parallel kernel :func:`tinybn.kernels.threads` threads (numba's setting belongs to
    the calling thread, and cannot exceed the threads numba started with)."""
    count = max(1, min(kernels.threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_threads, "count", None) != count:
        numba.set_num_threads(count)
        _threads.count = count


TERMS = 5       # terms of a sum added to its row of N in one pass (a row of LeNet's 5×5 kernels): see five_rows


@numba.njit(**JIT)
def five_rows(rows, start, stop, nothing):
    """rows[start], ..., rows[start + 4], with ``nothing`` (a row of zeros) in place of those from rows[stop] on.

    A kernel whose innermost loop adds w·x[k] to a row out[k] reads and writes that row once per term; adding
    w₀·x₀[k] + … + w₄·x₄[k] instead does it once per five. The weights beyond the last term are zeros (their
    arrays padded to :func:`padded_columns`), and so are the rows, so that an inf or NaN elsewhere cannot reach
    the sum."""
    return (rows[start] if start < stop else nothing, rows[start + 1] if start + 1 < stop else nothing,
            rows[start + 2] if start + 2 < stop else nothing, rows[start + 3] if start + 3 < stop else nothing,
            rows[start + 4] if start + 4 < stop else nothing)


def padded_columns(count: int) -> int:
    """count rounded up to a multiple of :data:`TERMS`."""
    return -(-count // TERMS) * TERMS


@numba.njit(**JIT)
def add_five(row, start, a0, a1, a2, a3, a4):
    """row[start:start + 5] += (a0, ..., a4): five sums kept in registers, written where they belong."""
    row[start] += a0
    row[start + 1] += a1
    row[start + 2] += a2
    row[start + 3] += a3
    row[start + 4] += a4


@numba.njit(**PARALLEL)
def row_sums(rows, sums):
    """sums[r] = Σ_k rows[r, k] in float64, the threads taking rows (a bias gradient: each channel's row of dy)."""
    for r in numba.prange(rows.shape[0]):
        total = 0.0
        for k in range(rows.shape[1]):
            total += rows[r, k]
        sums[r] = total
