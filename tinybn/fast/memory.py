"""Keep freed memory in the process instead of handing it back to the kernel after every step.

A training step allocates and frees the same large arrays (activations, gradients, im2col buffers)
every time. glibc's ``malloc`` serves blocks above a moving threshold with fresh ``mmap`` calls and
trims the top of its heap once enough of it is free, so each step can pay again for page faults and
for the kernel zeroing tens of megabytes, and whether it does depends on the history of the process:
after a large array was freed (loading a dataset frees several), glibc raises its thresholds by
itself and the step is steady. Measured here, LeNet-BN at batch 256 on batches made in memory: about
2,000 - 2,500 page faults and 10 ms of system time per step, 35 ms in all; with the thresholds fixed
(or after loading Fashion-MNIST), about 1 page fault and 23 ms. Fixing them makes blocks up to 32 MiB
come from the reusable heap whatever came before.

This is process-wide and cannot be undone, so tinybn never does it on its own: only
:func:`tinybn.fast.tune_process`, which the ``tinybn`` command line calls and reports, does.
Only glibc (Linux) has ``mallopt``; elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20        # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20       # free memory kept at the top of the heap before trimming

_outcome = None  # None until tried: every fast op asks, so a failure must not be retried


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; returns whether it could."""
    global _outcome
    if _outcome is None:
        _outcome = sys.platform.startswith("linux") and _set_thresholds()
    return _outcome


def _set_thresholds() -> bool:
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
