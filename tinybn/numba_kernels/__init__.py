"""The numba kernel family: some ops as plain loops compiled by numba, chosen with ``tinybn.kernels.use("numba")``.

Each module here holds, for one op of :mod:`tinybn.functional`, a forward and a backward that compute what the
reference computes, as loops over the arrays' elements, in batch-last memory (:mod:`tinybn.numba_kernels._common`):
the innermost loop runs over the batch, contiguous, so that the compiler vectorizes it, and the outermost is
shared among :func:`tinybn.kernels.threads` threads with ``numba.prange``. Each docstring names the reference
function and the derivation it implements; the tests hold each kernel to the reference, outputs and every
gradient (1e-12 relative in float64, rounding in float32). The family uses no BLAS: NumPy's, with its own threads,
would compete with numba's for the cores.

Compiled functions are cached next to their source (``cache=True``): the first run in a fresh clone compiles
them once. numba's threads come from OpenMP ("threadsafe": numba's fallback, workqueue, aborts the process when
two threads run parallel kernels at once). OpenMP's threads keep libgomp's default between kernels: they spin a
short while, then sleep, and the next kernel, a fraction of a millisecond later, finds them awake. Told to sleep at
once (``OMP_WAIT_POLICY=PASSIVE``, which this family set until 2026-12-04), every kernel paid for waking them: a
LeNet-BN step at batch 256 took 8.9 ms instead of 6.8 on the 2-core machine in docs/benchmarks.md, and a step at
batch 2 took 4.0 ms instead of 1.6. The price is paid when two processes share the cores, each with threads for
all of them: there the spinning threads take turns away from the working ones (two LeNet-BN trainings at once:
about 40 ms a step each, against 21 ms passive; PyTorch, whose threads spin too, 58 – 68 ms). Give each process
its share instead (``TINYBN_NUM_THREADS=1`` for two on two cores: 19 – 21 ms; the ranks of an MPI job get their
share this way already), or set ``OMP_WAIT_POLICY=PASSIVE``: a policy set by the user is left as it is.
"""
import os

import numba

if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "threadsafe"

from . import activation, batchnorm, conv, linear, pooling, shape  # noqa: E402,F401 - each registers its kernels
