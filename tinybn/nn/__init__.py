"""``tinybn.nn``: layers and models — the bookkeeping around :mod:`tinybn.functional`."""
from . import init
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, SyncBatchNorm
from .fold import fold_batch_norm
from .layers import AvgPool2d, Conv2d, CrossEntropyLoss, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sigmoid
from .module import Module, Parameter, Sequential, UninitializedBuffer, UninitializedParameter, is_materialized
from .norm import Normalization, convert_sync, normalization_layers, running_statistics
from .normalization import (BatchRenorm1d, BatchRenorm2d, DecorrelatedBatchNorm, GroupNorm, InstanceNorm2d,
                            LayerNorm, SyncBatchRenorm, SyncDecorrelatedBatchNorm)
from .precise import recompute_batch_norm_statistics

__all__ = ["AvgPool2d", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchRenorm1d", "BatchRenorm2d", "Conv2d",
           "CrossEntropyLoss", "DecorrelatedBatchNorm", "Dropout", "Flatten", "GroupNorm", "InstanceNorm2d", "LayerNorm",
           "Linear", "MaxPool2d", "Module", "Normalization", "Parameter", "ReLU", "Sequential", "Sigmoid",
           "SyncBatchNorm", "SyncBatchRenorm", "SyncDecorrelatedBatchNorm", "UninitializedBuffer",
           "UninitializedParameter", "convert_sync", "fold_batch_norm", "init", "is_materialized",
           "normalization_layers", "recompute_batch_norm_statistics", "running_statistics"]
