"""PyTorch state dicts in and out: ``load_torch_state_dict(model, state)`` and ``torch_state_dict(model)``.

A PyTorch ``nn.Sequential`` and a tinybn one with the same layers in the same order have the same dotted
prefixes ("0.", "1.", ...), and conv and dense weights have the same layouts, (out, in, kH, kW) and
(out, in). Batch norm differs in names and in one convention:

=========================  ==================================  =====================================
tinybn                     PyTorch ``nn.BatchNorm1d/2d``        what is converted
=========================  ==================================  =====================================
``gamma``, ``beta``         ``weight``, ``bias``                 names; shape (1, C[, 1, 1]) ↔ (C,)
``moving_mean``             ``running_mean``                     name and shape
``moving_var``              ``running_var``                      name and shape; the values as they are
``num_batches_tracked``     ``num_batches_tracked``              nothing
``momentum`` = 0.9          ``momentum`` = 0.1                   1 − m, when a module is given (not stored in a state dict)
=========================  ==================================  =====================================

What cannot be converted exactly: PyTorch's ``running_var`` is a moving average of *unbiased* batch variances
(σ² · m/(m − 1)), tinybn's of biased ones. The values are copied as they are, because they are what each
framework normalizes with in prediction mode, so predictions agree exactly. Training on from there mixes the
two: new batches enter tinybn's average as biased variances, smaller by the factor (m − 1)/m (1 − 6·10⁻⁶ for a
conv batch of 256 × 24 × 24 values, 1 − 0.004 for a dense batch of 256). The chapter's from-scratch PyTorch
layer (``gamma``, ``beta``, ``moving_mean``, ``moving_var``, shaped (1, C[, 1, 1])) is read too.

PyTorch is optional: this module imports without it; only ``torch_state_dict(..., as_tensors=True)`` and a
PyTorch module given to ``load_torch_state_dict`` need it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy

from .nn.batchnorm import _BatchNormBase
from .nn.normalization import DecorrelatedBatchNorm, InstanceNorm2d, _BatchRenormBase

# tinybn's name -> PyTorch's, per kind of layer
_BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
             "num_batches_tracked": "num_batches_tracked"}
_INSTANCE_NAMES = {"weight": "weight", "bias": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
                   "num_batches_tracked": "num_batches_tracked"}
# the chapter's from-scratch PyTorch layer keeps tinybn's names
_CHAPTER_NAMES = {name: name for name in ("gamma", "beta", "moving_mean", "moving_var")}


def _entries(model):
    """``(tinybn name, PyTorch name, alternative PyTorch name or None, the tinybn module)`` for every entry."""
    owners = {}
    for prefix, module in model.named_modules():
        for own in (*module._parameters, *module._buffers):
            owners[f"{prefix}.{own}" if prefix else own] = (prefix, own, module)
    for name, _ in model.state_dict().items() if _all_sized(model) else _names(model):
        prefix, own, module = owners[name]
        dotted = (prefix + ".") if prefix else ""
        if isinstance(module, (_BatchRenormBase, DecorrelatedBatchNorm)):
            raise ValueError(f"{prefix} ({module!r}) has no PyTorch counterpart, so its state cannot be converted")
        if isinstance(module, _BatchNormBase):
            alternative = _CHAPTER_NAMES.get(own)
            yield name, dotted + _BN_NAMES[own], alternative and dotted + alternative, module
        elif isinstance(module, InstanceNorm2d):
            yield name, dotted + _INSTANCE_NAMES[own], None, module
        else:
            yield name, name, None, module


def _all_sized(model):
    from .nn.module import is_materialized
    return all(is_materialized(t) for t in (*model.parameters(), *model.buffers()))


def _names(model):
    for name, _, _, _ in model._named_entries(("_parameters", "_buffers")):
        yield name, None


def _as_numpy(value):
    if hasattr(value, "detach"):                     # a torch.Tensor, on any device
        return value.detach().cpu().numpy()
    return numpy.asarray(value)


def torch_state_dict(model, as_tensors: bool = True) -> "OrderedDict":
    """``model``'s parameters and buffers under PyTorch's names and shapes, for a PyTorch model with the same
    layers (``torch_model.load_state_dict(...)``): torch tensors, or NumPy arrays with ``as_tensors=False``."""
    if as_tensors:
        try:
            import torch
        except ImportError:
            raise ImportError("torch_state_dict(as_tensors=True) needs PyTorch (pip install torch); "
                              "as_tensors=False gives NumPy arrays") from None
    state = model.state_dict()
    result = OrderedDict()
    for name, torch_name, _, module in _entries(model):
        value = state[name]
        if isinstance(module, _BatchNormBase) and value.ndim > 0:
            value = value.reshape(-1)
        result[torch_name] = torch.from_numpy(numpy.ascontiguousarray(value)) if as_tensors else value
    return result


def load_torch_state_dict(model, state) -> None:
    """Copy a PyTorch state dict (tensors or NumPy arrays), or a PyTorch module's state, into ``model``.

    Every entry is matched before anything is copied: missing, unexpected or mis-shaped entries raise a
    ``KeyError``/``ValueError`` that lists them all, and the model is left as it was. Values take the model's
    dtype and device. When ``state`` is a PyTorch module, each batch-norm layer's ``momentum`` (1 − PyTorch's;
    ``None``, a cumulative average, stays ``None``) and ``eps`` are taken too. See the module docstring for
    what cannot be converted exactly.
    """
    torch_module = state if hasattr(state, "state_dict") and hasattr(state, "named_modules") else None
    source = dict(torch_module.state_dict() if torch_module is not None else state)
    converted, used = OrderedDict(), set()
    for name, torch_name, alternative, module in _entries(model):
        key = torch_name if torch_name in source else alternative if alternative in source else None
        if key is None:
            continue                                  # load_state_dict reports it as missing
        value = _as_numpy(source[key])
        if isinstance(module, _BatchNormBase) and value.ndim > 0:     # (C,) or (1, C[, 1, 1]) into the layer's shape
            value = value.reshape(module._param_shape(value.size))
        converted[name] = value
        used.add(key)
    unexpected = [key for key in source if key not in used]
    if unexpected:
        raise KeyError(f"load_torch_state_dict: entries that match nothing in {type(model).__name__}: {unexpected}")
    model.load_state_dict(converted)
    if torch_module is not None:
        tinybn_layers = dict(model.named_modules())
        for prefix, layer in torch_module.named_modules():
            ours = tinybn_layers.get(prefix)
            if isinstance(ours, _BatchNormBase) and hasattr(layer, "momentum") and hasattr(layer, "eps"):
                ours.momentum = None if layer.momentum is None else 1.0 - float(layer.momentum)
                ours.eps = float(layer.eps)
