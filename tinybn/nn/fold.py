"""Batch norm folded into the convolution or dense layer before it, for prediction.

In prediction mode a BN layer is an affine map per channel, ``y = γ (z − μ) / √(σ² + ε) + β``, and the conv or
linear layer before it is affine too, ``z = W x + b``; so their composition is one layer::

    s  = γ / √(σ² + ε)                         (per output channel)
    W′ = s · W                                 (each output channel's filter or row scaled by its s)
    b′ = s · (b − μ) + β                       (b = 0 for a layer without bias)

The folded model computes the same function with one layer fewer, and skips batch norm's passes over the
activations. Decorrelated BN folds the same way with its whitening matrix M instead of the diagonal s:
``W′ = diag(γ) M W``, ``b′ = γ · M (b − μ) + β``. Layer, group and instance norm cannot be folded: their statistics
come from each input.
"""
from __future__ import annotations

import copy

import numpy

from .. import backend
from .batchnorm import _BatchNormBase
from .layers import Conv2d, Linear
from .module import Module, Parameter, Sequential, is_materialized
from .normalization import DecorrelatedBatchNorm

FOLDABLE = (_BatchNormBase, DecorrelatedBatchNorm)


def _host64(tensor):
    return backend.to_numpy(tensor.data).astype(numpy.float64).reshape(tensor.shape)


def _fold_into(layer, norm) -> None:
    """Fold ``norm`` (prediction mode) into ``layer`` (Conv2d or Linear), in place; the arithmetic in float64."""
    weight = _host64(layer.weight)
    out = weight.shape[0]
    bias = _host64(layer.bias) if layer.bias is not None else numpy.zeros(out)
    gamma, beta = _host64(norm.gamma).reshape(-1), _host64(norm.beta).reshape(-1)
    mean = _host64(norm.moving_mean).reshape(-1)
    if isinstance(norm, DecorrelatedBatchNorm):
        matrix = gamma[:, None] * _host64(norm.moving_whitening)            # diag(γ) M
        new_weight = (matrix @ weight.reshape(out, -1)).reshape(weight.shape)
        new_bias = matrix @ (bias - mean) + beta
    else:
        scale = gamma / numpy.sqrt(_host64(norm.moving_var).reshape(-1) + norm.eps)
        new_weight = weight * scale.reshape((out,) + (1,) * (weight.ndim - 1))
        new_bias = scale * (bias - mean) + beta
    device, dtype = layer.weight.device, layer.weight.dtype
    layer.weight.data = backend.to_device(new_weight.astype(dtype), device)
    if layer.bias is None:
        layer.register_parameter("bias", Parameter(backend.to_device(new_bias.astype(dtype), device)))
    else:
        layer.bias.data = backend.to_device(new_bias.astype(dtype), device)


def _uses(model: Module) -> dict:
    """How many places (parent, name) hold each module: a layer used twice has 2."""
    counts, stack, seen = {}, [model], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for child in module._modules.values():
            if child is not None:
                counts[id(child)] = counts.get(id(child), 0) + 1
                stack.append(child)
    return counts


def fold_batch_norm(model: Module) -> Module:
    """A new model for prediction in which every Conv2d or Linear layer followed, in a Sequential, by a batch-norm
    layer in prediction mode has absorbed it, and the BN layers are gone. ``model`` itself is unchanged.

    Folds tinybn's BN layers of every kind (``BatchNorm``, ``BatchNorm1d/2d``, ``SyncBatchNorm``, batch renorm,
    whose prediction mode is batch norm's) and ``DecorrelatedBatchNorm``. Refused, naming the layer: a model or
    BN layer in training mode (its output depends on the batch; call ``model.eval()``), a BN layer that does
    not directly follow a Conv2d or Linear layer in a plain ``Sequential`` (a subclass may have its own forward,
    which removing a layer would change), a layer used in more than one place (folding would change its other
    uses too), and a layer whose size is not known yet.
    """
    for name, module in model.named_modules():
        if isinstance(module, FOLDABLE) and module.training:
            raise ValueError(f"fold_batch_norm: {name or 'the model'} ({module!r}) is in training mode, where batch "
                             f"norm uses each batch's statistics and cannot be folded; call model.eval() first")
        if isinstance(module, FOLDABLE) and not all(is_materialized(t) for t in (module.gamma, module.moving_mean)):
            raise ValueError(f"fold_batch_norm: {name or 'the model'} ({module!r}) has no size yet; run one batch "
                             f"through the model first")
    folded = copy.deepcopy(model)
    uses = _uses(folded)

    def fold(module, prefix):
        if type(module) is Sequential:
            layers, names = [], []
            for name, layer in module._modules.items():
                path = f"{prefix}{name}"
                if isinstance(layer, FOLDABLE):
                    before = layers[-1] if layers else None
                    if isinstance(before, _Folded):
                        raise ValueError(f"fold_batch_norm: {path} ({layer!r}) follows another BN layer, already "
                                         f"folded into {names[-1]}; each BN layer needs a Conv2d or Linear layer of "
                                         f"its own right before it")
                    if not isinstance(before, (Conv2d, Linear)):
                        what = "nothing" if before is None else f"{names[-1]} ({before!r})"
                        raise ValueError(f"fold_batch_norm: {path} ({layer!r}) follows {what}, not a Conv2d or "
                                         f"Linear layer, so there is no layer to fold it into")
                    for shared, name_of in ((before, names[-1]), (layer, path)):
                        if uses.get(id(shared), 1) > 1:
                            raise ValueError(f"fold_batch_norm: {name_of} ({shared!r}) is used in more than one place, "
                                             f"and folding would change every use; such a model cannot be folded")
                    _fold_into(before, layer)
                    layers[-1] = _Folded(before)       # a BN right after this one has nothing left to fold into
                    continue
                layers.append(fold(layer, path + "."))
                names.append(path)
            return Sequential(*(getattr(layer, "layer", layer) for layer in layers)).train(module.training)
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, fold(child, f"{prefix}{name}."))
        return module

    result = fold(folded, "")
    for name, module in result.named_modules():
        if isinstance(module, FOLDABLE):
            raise ValueError(f"fold_batch_norm: {name or 'the model'} ({module!r}) is not inside a plain Sequential "
                             f"right after a Conv2d or Linear layer, so there is no layer to fold it into")
    return result


class _Folded:
    """A layer that has absorbed a BN layer, while its Sequential is rebuilt."""

    def __init__(self, layer):
        self.layer = layer
