"""2-D convolution (cross-correlation, as in every deep-learning library), NCHW layout.

Shapes: x (N, C_in, H, W), weight W (C_out, C_in, kH, kW), bias b (C_out,),
y (N, C_out, H_out, W_out) with H_out = ⌊(H + 2·pH − kH) / sH⌋ + 1 (likewise W_out).

Forward, with x̃ the zero-padded input::

    y[n, o, i, j] = b[o] + Σ_{c, p, q} W[o, c, p, q] · x̃[n, c, i·sH + p, j·sW + q]

Backward (docs/derivations.md, "Convolution"): every output element is a dot product of one
window of x̃ with one filter, so

    dW[o, c, p, q] = Σ_{n, i, j} dy[n, o, i, j] · x̃[n, c, i·sH + p, j·sW + q]
    db[o]          = Σ_{n, i, j} dy[n, o, i, j]
    dx̃[n, c, i·sH + p, j·sW + q] += Σ_o dy[n, o, i, j] · W[o, c, p, q]     (then crop the padding)

The window view ``windows(x̃)[n, c, i, j, p, q] = x̃[n, c, i·sH + p, j·sW + q]`` turns each of these
sums into one ``tensordot`` (an im2col followed by a matrix product).

What runs is this code, unless a program asks for a kernel family (``tinybn.kernels.use("numba")``, as
``python -m tinybn`` and the examples do): then a compiled kernel of the op (stride 1) runs instead, on NumPy float32 and
float64 arrays (``tinybn/numba_kernels/conv.py``, tested equal to this code). ``tinybn.kernels.active()`` says which family runs, and
``tinybn.ops.Recorder`` which implementation of which op ran.
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module
from ._util import add_window_grads, crop_hw, output_size, pad_hw, pair, windows


def conv2d_geometry(x_shape, weight_shape, stride, padding):
    """``((sH, sW), (pH, pW), (H_out, W_out))``, after checking that x and the weight fit together."""
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    if len(x_shape) != 4 or len(weight_shape) != 4:
        raise ValueError(f"conv2d expects x of shape (N, C_in, H, W) and a weight of shape (C_out, C_in, kH, kW), "
                         f"got {tuple(x_shape)} and {tuple(weight_shape)}")
    (_, c_in, h, w), (_, weight_c_in, kh, kw) = x_shape, weight_shape
    if c_in != weight_c_in:
        raise ValueError(f"conv2d: x has {c_in} channels but the weight expects {weight_c_in} "
                         f"(shapes {tuple(x_shape)} and {tuple(weight_shape)})")
    if min(sh, sw, kh, kw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"conv2d: the kernel and stride must be positive and the padding not negative, got kernel "
                         f"{(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}")
    out_h, out_w = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"conv2d: a {kh}x{kw} kernel with padding {(ph, pw)} does not fit an input of {h}x{w}")
    return (sh, sw), (ph, pw), (out_h, out_w)


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    xp = get_array_module(x, weight)
    (sh, sw), (ph, pw), (out_h, out_w) = conv2d_geometry(x.shape, weight.shape, stride, padding)
    c_out, _, kh, kw = weight.shape
    x_pad = pad_hw(x, ph, pw)
    patches = windows(x_pad, kh, kw, sh, sw, out_h, out_w)            # (N, C_in, H_out, W_out, kH, kW)
    y = xp.tensordot(patches, weight, axes=((1, 4, 5), (1, 2, 3)))   # (N, H_out, W_out, C_out)
    y = xp.ascontiguousarray(y.transpose(0, 3, 1, 2))
    if bias is not None:
        y += bias.reshape(1, c_out, 1, 1)
    cache = Cache(x_pad=x_pad, weight=weight, has_bias=bias is not None, stride=(sh, sw), padding=(ph, pw),
                  out_hw=(out_h, out_w))
    return y, cache


def conv2d_backward(dy, cache):
    xp = get_array_module(dy)
    sh, sw = cache.stride
    ph, pw = cache.padding
    out_h, out_w = cache.out_hw
    weight = cache.weight
    kh, kw = weight.shape[2:]
    patches = windows(cache.x_pad, kh, kw, sh, sw, out_h, out_w)
    dweight = xp.tensordot(dy, patches, axes=((0, 2, 3), (0, 2, 3)))   # (C_out, C_in, kH, kW)
    dbias = dy.sum(axis=(0, 2, 3)) if cache.has_bias else None
    dx = None
    if cache.needs(0):  # the first layer's input is data: skip the most expensive term
        dpatch = xp.tensordot(dy, weight, axes=((1,), (0,)))           # (N, H_out, W_out, C_in, kH, kW)
        dx_pad = xp.zeros_like(cache.x_pad)
        add_window_grads(dx_pad, dpatch.transpose(0, 3, 1, 2, 4, 5), kh, kw, sh, sw, out_h, out_w)
        dx = crop_hw(dx_pad, ph, pw)
    return dx, dweight, dbias


ops.define("conv2d", conv2d_forward, conv2d_backward)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution of x (N, C_in, H, W) with weight (C_out, C_in, kH, kW); stride and padding: int or pair."""
    conv2d_geometry(tuple(x.shape), tuple(weight.shape), stride, padding)   # bad shapes fail here, for every kernel
    return apply("conv2d", x, weight, bias, stride=stride, padding=padding)
