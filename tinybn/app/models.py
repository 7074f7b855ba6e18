"""LeNet and LeNet with batch norm, as in the chapter, plus the variants its exercises ask for."""
from __future__ import annotations

from .. import nn

MODELS = ("lenet", "lenet-bn", "lenet-bn-concise")
NORMS = ("none", "scratch", "concise", "layer", "group", "renorm", "decorrelated")
GROUPS = (2, 4, 8, 4)     # GroupNorm's groups in LeNet's four slots: 3, 4, 15 and 21 channels per group


def build_lenet(norm: str = "none", conv_bias: bool = True, bn_layers=(0, 1, 2, 3), dropout: float = 0.0,
                train_bn_affine: bool = True, device=None) -> nn.Sequential:
    """LeNet-5 for 1×28×28 input with sigmoid activations and max pooling.

    ``norm``: ``"none"``, ``"scratch"`` (the chapter's ``BatchNorm(num_features, num_dims)``) or
    ``"concise"`` (``BatchNorm2d``/``BatchNorm1d`` with inferred sizes), placed after each of the four
    hidden conv/dense layers listed in ``bn_layers`` (0, 1: convs; 2, 3: dense), before its sigmoid; or, in
    the same places, another normalization (:data:`NORMS`): ``"layer"`` (``LayerNorm`` over each example's
    (C, H, W) or (C,) values), ``"group"`` (``GroupNorm`` with :data:`GROUPS` groups), ``"renorm"``
    (``BatchRenorm2d/1d``) or ``"decorrelated"`` (``DecorrelatedBatchNorm``, groups of 16 channels).
    ``conv_bias=False`` removes the bias of the layers followed by BN (it is redundant there).
    ``dropout`` > 0 adds dropout after the two hidden dense activations. ``train_bn_affine=False``
    freezes γ = 1 and β = 0. Conv and dense weights are Xavier-uniform initialised.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    widths = [(6, 4), (16, 4), (120, 2), (84, 2)]
    sizes = [(6, 24, 24), (16, 8, 8), (120,), (84,)]    # what each hidden layer puts out, per example

    def bn(i):
        channels, num_dims = widths[i]
        if norm == "scratch":
            return [nn.BatchNorm(channels, num_dims=num_dims)]
        if norm == "layer":
            return [nn.LayerNorm(sizes[i])]
        if norm == "group":
            return [nn.GroupNorm(GROUPS[i], channels)]
        if norm == "renorm":
            return [nn.BatchRenorm2d(channels) if num_dims == 4 else nn.BatchRenorm1d(channels)]
        if norm == "decorrelated":
            return [nn.DecorrelatedBatchNorm(channels, group_size=16)]
        return [nn.BatchNorm2d() if num_dims == 4 else nn.BatchNorm1d()]

    def has_bn(i):
        return norm != "none" and i in bn_layers

    def block(i, layer):
        layers = [layer] + (bn(i) if has_bn(i) else []) + [nn.Sigmoid()]
        if i >= 2 and dropout > 0:
            layers.append(nn.Dropout(dropout))
        return layers

    bias = [conv_bias or not has_bn(i) for i in range(4)]
    net = nn.Sequential(
        *block(0, nn.Conv2d(1, 6, kernel_size=5, bias=bias[0])), nn.MaxPool2d(2, stride=2),
        *block(1, nn.Conv2d(6, 16, kernel_size=5, bias=bias[1])), nn.MaxPool2d(2, stride=2),
        nn.Flatten(),
        *block(2, nn.Linear(16 * 4 * 4, 120, bias=bias[2])),
        *block(3, nn.Linear(120, 84, bias=bias[3])),
        nn.Linear(84, 10))
    for module in net:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, (nn.BatchNorm, nn.BatchNorm1d)) and not train_bn_affine:
            module.gamma.requires_grad = module.beta.requires_grad = False
        if not train_bn_affine and norm in ("layer", "group", "decorrelated"):
            raise ValueError(f"train_bn_affine=False is for the batch-norm layers, not norm={norm!r}")
    return net.to(device) if device is not None else net


def build_model(name: str, device=None) -> nn.Sequential:
    """One of :data:`MODELS` by name."""
    if name == "lenet":
        return build_lenet("none", device=device)
    if name == "lenet-bn":
        return build_lenet("scratch", device=device)
    if name == "lenet-bn-concise":
        return build_lenet("concise", device=device)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
