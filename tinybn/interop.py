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

from .nn.module import is_materialized
from .nn.norm import Normalization


def _module_paths(model) -> dict:
    """Every dotted path of every module, aliases included (a layer used twice has two, as in PyTorch's
    state dicts), in PyTorch's order: id(module) -> [prefix, ...]."""
    paths = {}

    def walk(module, prefix, active):
        paths.setdefault(id(module), []).append(prefix)
        if id(module) in active:
            return
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name, active | {id(module)})

    walk(model, "", frozenset())
    return paths


class _Entry:
    """One tinybn parameter or buffer and the PyTorch keys that may hold it: one per place that holds it (a layer
    used twice, a weight tied between two layers: PyTorch's state dicts list every place). A normalization layer
    says its PyTorch names (``torch_names``; None: it has no PyTorch counterpart); every other layer's names are
    PyTorch's."""

    def __init__(self, name, module, own):
        self.name, self.module, self.own = name, module, own
        self.torch_keys, self.keys = [], []     # what is written; what is accepted on loading
        norm = isinstance(module, Normalization)
        self.is_bn = norm and own != "num_batches_tracked" and "gamma" in (module.torch_names or {})

    def add_place(self, module, own, prefixes):
        norm = isinstance(module, Normalization)
        if norm and module.torch_names is None:
            raise ValueError(f"{prefixes[0] or 'the model'} ({module!r}) has no PyTorch counterpart, so its state "
                             f"cannot be converted")
        torch_own = module.torch_names.get(own, own) if norm else own
        keys = [f"{prefix}.{torch_own}" if prefix else torch_own for prefix in prefixes]
        self.torch_keys += keys
        self.keys += keys
        if norm and torch_own != own:             # the chapter's from-scratch layer keeps tinybn's names
            self.keys += [f"{prefix}.{own}" if prefix else own for prefix in prefixes]

    def to_torch(self, value):
        return self.module.to_torch(self.own, value) if isinstance(self.module, Normalization) else value

    def from_torch(self, value):
        return self.module.from_torch(self.own, value) if isinstance(self.module, Normalization) else value


def _entries(model) -> list:
    """One entry per tensor of the model's state dict, with every place that holds it."""
    paths = _module_paths(model)
    entries = {id(tensor): _Entry(name, owner, own) for name, owner, own, tensor in
               model._named_entries(("_parameters", "_buffers"))}
    for _, module in model.named_modules():
        for registry in (module._parameters, module._buffers):
            for own, tensor in registry.items():
                if tensor is not None:
                    entries[id(tensor)].add_place(module, own, paths[id(module)])
    return list(entries.values())


def _as_numpy(value):
    if hasattr(value, "detach"):                     # a torch.Tensor, on any device
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":     # NumPy has no bfloat16
            value = value.float()
        return value.numpy()
    return numpy.asarray(value)


def _fits(entry, value):
    """``value`` in the shape the tinybn entry needs (the layer reshapes what is its to reshape), or None."""
    tensor = getattr(entry.module, entry.own)
    value = entry.from_torch(value)
    if value is None or (is_materialized(tensor) and tuple(value.shape) != tuple(tensor.shape)):
        return None
    return value


def torch_state_dict(model, as_tensors: bool = True) -> "OrderedDict":
    """``model``'s parameters and buffers under PyTorch's names and shapes, for a PyTorch model with the same
    layers (``torch_model.load_state_dict(...)``): torch tensors, or NumPy arrays with ``as_tensors=False``.
    A layer used in two places appears under both names, as in PyTorch."""
    if as_tensors:
        try:
            import torch
        except ImportError:
            raise ImportError("torch_state_dict(as_tensors=True) needs PyTorch (pip install torch); "
                              "as_tensors=False gives NumPy arrays") from None
    state = model.state_dict()
    result = OrderedDict()
    for entry in _entries(model):
        value = entry.to_torch(state[entry.name])
        for key in entry.torch_keys:
            copy = numpy.array(value, order="C")          # keeps a 0-d counter 0-d
            result[key] = torch.from_numpy(copy) if as_tensors else copy
    return result


def _torch_settings(model, torch_module) -> list:
    """``(tinybn module, attribute, value)`` for each setting to take from a PyTorch module: what each normalization
    layer says it takes (:meth:`~tinybn.nn.norm.Normalization.torch_settings`: eps, and the momentum of batch norm
    and instance norm as 1 − PyTorch's)."""
    settings = []
    ours = {prefix: module for prefix, module in model.named_modules()}
    for prefix, layer in torch_module.named_modules():
        mine = ours.get(prefix)
        if isinstance(mine, Normalization) and mine.torch_names is not None:
            try:
                settings += [(mine, name, value) for name, value in mine.torch_settings(layer).items()]
            except ValueError as error:
                raise ValueError(f"{prefix}: {error}") from None
    return settings


def load_torch_state_dict(model, state) -> None:
    """Copy a PyTorch state dict (tensors or NumPy arrays), or a PyTorch module's state, into ``model``.

    Every entry is matched and its shape checked before anything is copied: missing, unexpected and mis-shaped
    entries are listed together (under PyTorch's names) in one ``KeyError``/``ValueError``, and the model is
    left as it was. A missing ``num_batches_tracked`` is taken as 0, as PyTorch does for old checkpoints. Values
    take the model's dtype and device. When ``state`` is a PyTorch module, the ``eps`` of every normalization
    layer is taken too, and the ``momentum`` of batch norm and instance norm (1 − PyTorch's; ``None``, a
    cumulative average, stays ``None`` for batch norm), as are the chapter's from-scratch layer's moving
    statistics, which it keeps outside its state dict. See the module docstring for what cannot be converted
    exactly.
    """
    torch_module = state if hasattr(state, "state_dict") and hasattr(state, "named_modules") else None
    source = dict(torch_module.state_dict() if torch_module is not None else state)
    if torch_module is not None:
        for prefix, layer in torch_module.named_modules():
            for own in ("moving_mean", "moving_var"):
                key = f"{prefix}.{own}" if prefix else own
                if key not in source and hasattr(getattr(layer, own, None), "detach"):
                    source[key] = getattr(layer, own)
    settings = _torch_settings(model, torch_module) if torch_module is not None else []
    converted, used, missing, wrong = OrderedDict(), set(), [], []
    for entry in _entries(model):
        present = [key for key in entry.keys if key in source]
        used.update(present)
        if not present:
            if entry.own == "num_batches_tracked":
                converted[entry.name] = numpy.zeros((), numpy.int64)
            else:
                hint = (" (a PyTorch BatchNorm with affine=False has no weight and bias; tinybn's batch norm always "
                        "has them)" if entry.is_bn and entry.own in ("gamma", "beta") else "")
                missing.append(entry.keys[0] + hint)
            continue
        values = [_as_numpy(source[key]) for key in present]
        value = _fits(entry, values[0])
        if value is None:
            tensor = getattr(entry.module, entry.own)
            wrong.append(f"{present[0]} has shape {values[0].shape}, {entry.name} needs "
                         f"{tuple(tensor.shape) if is_materialized(tensor) else 'one value per channel'}")
            continue
        if any(not numpy.array_equal(values[0], other) for other in values[1:]):
            wrong.append(f"{', '.join(present)} name one tinybn tensor ({entry.name}) but hold different values")
            continue
        converted[entry.name] = value
    unexpected = [key for key in source if key not in used]
    if missing or unexpected:
        raise KeyError(f"load_torch_state_dict: missing entries {missing}, entries that match nothing in "
                       f"{type(model).__name__} {unexpected}" + (f"; and {'; '.join(wrong)}" if wrong else ""))
    if wrong:
        raise ValueError("load_torch_state_dict: " + "; ".join(wrong))
    model.load_state_dict(converted)
    for module, attribute, value in settings:
        setattr(module, attribute, value)
