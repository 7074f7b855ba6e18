"""``tinybn.functional``: the mathematics, one file per operation.

Each file holds, for its operation, the pure array functions ``<op>_forward(...) -> (y, cache)`` and
``<op>_backward(dy, cache) -> (dx, ...)`` side by side, and ``<op>(...)``, which runs them on tensors
and records the backward for autograd. The derivations are in ``docs/derivations.md``.
"""
from .activation import relu, sigmoid
from .batchnorm import batch_norm
from .batchrenorm import batch_renorm
from .conv import conv2d
from .dropout import dropout
from .groupnorm import group_norm
from .layernorm import layer_norm
from .linear import linear
from .loss import cross_entropy
from .pooling import avg_pool2d, max_pool2d
from .shape import flatten
from .syncbatchnorm import sync_batch_norm, sync_batch_renorm, sync_decorrelated_batch_norm
from .whitening import decorrelated_batch_norm

__all__ = ["avg_pool2d", "batch_norm", "batch_renorm", "conv2d", "cross_entropy", "decorrelated_batch_norm", "dropout",
           "flatten", "group_norm", "layer_norm", "linear", "max_pool2d", "relu", "sigmoid", "sync_batch_norm",
           "sync_batch_renorm", "sync_decorrelated_batch_norm"]
