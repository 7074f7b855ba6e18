"""``tinybn.nn``: layers and models — the bookkeeping around :mod:`tinybn.functional`."""
from . import init
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, SyncBatchNorm, recompute_batch_norm_statistics
from .fold import fold_batch_norm
from .layers import AvgPool2d, Conv2d, CrossEntropyLoss, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sigmoid
from .normalization import (BatchRenorm1d, BatchRenorm2d, DecorrelatedBatchNorm, GroupNorm, InstanceNorm2d,
                            LayerNorm)
from .module import Module, Parameter, Sequential, UninitializedBuffer, UninitializedParameter, is_materialized

__all__ = ["AvgPool2d", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchRenorm1d", "BatchRenorm2d", "Conv2d",
           "CrossEntropyLoss", "DecorrelatedBatchNorm", "Dropout", "Flatten", "GroupNorm", "InstanceNorm2d", "LayerNorm",
           "Linear", "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "Sigmoid", "SyncBatchNorm",
           "UninitializedBuffer", "UninitializedParameter", "fold_batch_norm", "init", "is_materialized", "recompute_batch_norm_statistics"]
