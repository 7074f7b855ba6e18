"""Devices the suite runs on: NumPy ("cpu"), the strict CuPy stand-in ("strict"), and CuPy ("gpu") if present."""
import numpy
import pytest

import tinybn
from tinybn import backend

import props  # noqa: F401 - registers the Hypothesis profiles (CI budget, TINYBN_EXPLORE)
from strict_xp import strict

backend.register_array_module("strict", strict)

DEVICES = ["cpu", "strict"] + (["gpu"] if backend.cupy_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every op test runs once per array module: NumPy, the strict stand-in, and CuPy when a GPU is there."""
    return request.param


KERNELS = tinybn.kernels.active()     # what `import tinybn` chose: the reference, unless TINYBN_KERNELS says


@pytest.fixture(autouse=True)
def _seeded():
    """Each test starts seeded and with the kernel family `import tinybn` chose: a test module that imports an
    example script (which chooses the fastest kernels at its top, at collection time) or a test that runs the
    command line in-process must not change what other tests check."""
    tinybn.manual_seed(0)
    tinybn.kernels.use(KERNELS)
    yield
    tinybn.kernels.use(KERNELS)


def make(array, device, requires_grad=False):
    return tinybn.tensor(numpy.asarray(array), device=device, requires_grad=requires_grad)


class Samples:
    """Test inputs drawn from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = numpy.random.default_rng(seed)

    def randn(self, *shape):
        return self.rng.standard_normal(shape)

    def positive(self, *shape):
        return self.rng.uniform(0.5, 1.5, shape)

    def distinct(self, *shape):
        """Values far apart, so max pooling has no near-ties that central differences would straddle."""
        return self.rng.permutation(numpy.arange(int(numpy.prod(shape)), dtype=float)).reshape(shape) * 0.1
