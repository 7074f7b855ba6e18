"""Weight initialisation, drawn on the host from tinybn's seeded generator (same numbers on every device)."""
from __future__ import annotations

import math

import numpy

from .. import backend
from .. import random as tb_random


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense (out, in) or conv (out, in, kh, kw) weight."""
    receptive = int(numpy.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def uniform(shape, bound: float, dtype=numpy.float32):
    return tb_random.generator(numpy).uniform(-bound, bound, size=shape).astype(dtype)


def xavier_uniform_(param) -> None:
    """Glorot/Xavier: U(−a, a) with a = √(6 / (fan_in + fan_out)), in place on a parameter."""
    fan_in, fan_out = fans(param.shape)
    value = uniform(param.shape, math.sqrt(6.0 / (fan_in + fan_out)), param.dtype)
    param.data = backend.to_device(value, param.device)
