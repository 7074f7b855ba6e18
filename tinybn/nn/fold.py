"""Normalization folded into the convolution or dense layer before it, for prediction.

In prediction mode a batch-norm layer is an affine map per channel, ``y = γ (z − μ) / √(σ² + ε) + β``, and the conv
or linear layer before it is affine too, ``z = W x + b``; so their composition is one layer. Each normalization
layer says what its prediction mode is, as ``y = A·z + c`` (:meth:`tinybn.nn.norm.Normalization.prediction_affine`),
and folding only multiplies::

    W′ = A · W          (A (C,): each output channel's filter or row scaled; A (C, C): a matrix over them)
    b′ = A · b + c      (b = 0 for a layer without bias)

For batch norm A = γ / √(σ² + ε) and c = β − A·μ; for decorrelated BN A = diag(γ) M, with M its whitening
matrix. The folded model computes the same function with one layer fewer, and skips the normalization's passes
over the activations. Layers whose statistics come from each input (layer and group norm, instance norm without
running statistics) have no such map and stay in the model as they are.
"""
from __future__ import annotations

import copy

import numpy

from .. import backend
from .layers import Conv2d, Linear
from .module import Module, Parameter, Sequential, is_materialized
from .norm import Normalization


def _host64(tensor):
    return backend.to_numpy(tensor.data).astype(numpy.float64).reshape(tensor.shape)


def _foldable(module) -> bool:
    """A normalization layer whose prediction mode is a fixed affine map: one with running statistics."""
    return isinstance(module, Normalization) and bool(module.running_statistics)


def _fold_into(layer, norm) -> None:
    """Fold ``norm`` (prediction mode) into ``layer`` (Conv2d or Linear), in place; the arithmetic in float64."""
    A, c = norm.prediction_affine()
    weight = _host64(layer.weight)
    out = weight.shape[0]
    bias = _host64(layer.bias) if layer.bias is not None else numpy.zeros(out)
    if A.ndim == 2:
        new_weight, new_bias = (A @ weight.reshape(out, -1)).reshape(weight.shape), A @ bias + c
    else:
        new_weight, new_bias = weight * A.reshape((out,) + (1,) * (weight.ndim - 1)), A * bias + c
    device, dtype = layer.weight.device, layer.weight.dtype
    layer.weight.data = backend.to_device(new_weight.astype(dtype), device)
    if layer.bias is None:
        layer.register_parameter("bias", Parameter(backend.to_device(new_bias.astype(dtype), device)))
    else:
        layer.bias.data = backend.to_device(new_bias.astype(dtype), device)


def _uses(model: Module) -> dict:
    """How many places hold each module (a (parent, name) slot) and each parameter (a (module, name) slot): a layer
    used twice, or a weight tied between two layers, has 2."""
    counts, stack, seen = {}, [model], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for parameter in module._parameters.values():
            if parameter is not None:
                counts[id(parameter)] = counts.get(id(parameter), 0) + 1
        for child in module._modules.values():
            if child is not None:
                counts[id(child)] = counts.get(id(child), 0) + 1
                stack.append(child)
    return counts


def _check_pair(before, layer, names, uses) -> None:
    """Refuse, naming it, what folding ``layer`` into ``before`` would get wrong."""
    (before_name, path) = names
    for shared, name_of in ((before, before_name), (layer, path)):
        if uses.get(id(shared), 1) > 1:
            raise ValueError(f"fold_batch_norm: {name_of} ({shared!r}) is used in more than one place, and folding "
                             f"would change every use; such a model cannot be folded")
        if shared.__dict__.get("_forward_hooks"):
            raise ValueError(f"fold_batch_norm: {name_of} ({shared!r}) has forward hooks, which would see another "
                             f"output, or none, once it is folded; remove them first (handle.remove())")
    for name, parameter in before._parameters.items():
        if parameter is not None and uses.get(id(parameter), 1) > 1:
            raise ValueError(f"fold_batch_norm: {before_name}.{name} is a parameter shared with another layer (a tied "
                             f"weight), and folding {path} into it would change that layer too; untie it first")


def _fold_sequential(module, prefix, uses):
    """A new Sequential with each foldable normalization folded into the Conv2d or Linear layer before it."""
    layers, names = [], []
    for name, layer in module._modules.items():
        path = f"{prefix}{name}"
        if _foldable(layer):
            before = layers[-1] if layers else None
            if isinstance(before, _Folded):
                raise ValueError(f"fold_batch_norm: {path} ({layer!r}) follows another normalization layer, already "
                                 f"folded into {names[-1]}; each needs a Conv2d or Linear layer of its own right "
                                 f"before it")
            if not isinstance(before, (Conv2d, Linear)):
                what = "nothing" if before is None else f"{names[-1]} ({before!r})"
                raise ValueError(f"fold_batch_norm: {path} ({layer!r}) follows {what}, not a Conv2d or Linear "
                                 f"layer, so there is no layer to fold it into")
            _check_pair(before, layer, (names[-1], path), uses)
            _fold_into(before, layer)
            layers[-1] = _Folded(before)       # a normalization right after this one has nothing left to fold into
            continue
        layers.append(_fold(layer, path + ".", uses))
        names.append(path)
    folded = Sequential(*(getattr(layer, "layer", layer) for layer in layers))
    object.__setattr__(folded, "training", module.training)    # this container's mode only: its layers keep theirs
    if module.__dict__.get("_forward_hooks"):
        object.__setattr__(folded, "_forward_hooks", module._forward_hooks)   # the same function: its hooks stay
    return folded


def _fold(module, prefix, uses):
    if type(module) is Sequential:
        return _fold_sequential(module, prefix, uses)
    for name, child in list(module._modules.items()):
        if child is not None:
            setattr(module, name, _fold(child, f"{prefix}{name}.", uses))
    return module


def fold_batch_norm(model: Module) -> Module:
    """A new model for prediction in which every Conv2d or Linear layer followed, in a Sequential, by a
    normalization layer with running statistics has absorbed it, and those layers are gone. ``model`` itself,
    and every parameter it holds, is unchanged (the work is done on a copy). Each module keeps its own mode.

    Folds every layer whose prediction mode is a fixed affine map (:meth:`~tinybn.nn.norm.Normalization.
    prediction_affine`: batch norm of every kind, batch renorm, decorrelated BN, instance norm with running
    statistics); layer and group norm stay. Refused, naming the layer: such a layer in training mode (its output
    depends on the batch; call ``model.eval()``), one that does not directly follow a Conv2d or Linear layer in a
    plain ``Sequential`` (a subclass may have its own forward, which removing a layer would change), a layer used
    in more than one place or a weight tied between layers (folding would change their other uses too), a layer
    with forward hooks (they would lose what they watch), and a layer whose size is not known yet.
    """
    for name, module in model.named_modules():
        if not _foldable(module):
            continue
        if module.training:
            raise ValueError(f"fold_batch_norm: {name or 'the model'} ({module!r}) is in training mode, where it "
                             f"normalizes with each batch's statistics and cannot be folded; call model.eval() first")
        if not all(is_materialized(t) for t in (*module.parameters(), *module.buffers())):
            raise ValueError(f"fold_batch_norm: {name or 'the model'} ({module!r}) has no size yet; run one batch "
                             f"through the model first")
    folded = copy.deepcopy(model)
    result = _fold(folded, "", _uses(folded))
    for name, module in result.named_modules():
        if _foldable(module):
            raise ValueError(f"fold_batch_norm: {name or 'the model'} ({module!r}) is not inside a plain Sequential "
                             f"right after a Conv2d or Linear layer, so there is no layer to fold it into")
    return result


class _Folded:
    """A layer that has absorbed a normalization layer, while its Sequential is rebuilt."""

    def __init__(self, layer):
        self.layer = layer
