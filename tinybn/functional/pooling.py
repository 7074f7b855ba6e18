"""Max and average pooling over kH×kW windows, NCHW layout.

Shapes: x (N, C, H, W) -> y (N, C, H_out, W_out), H_out = ⌊(H + 2·pH − kH) / sH⌋ + 1.
The stride defaults to the kernel size (non-overlapping windows).

Max pooling::

    y[n, c, i, j] = max_{p, q} x̃[n, c, i·sH + p, j·sW + q]         (x̃ padded with −∞)
    dx̃ at the arg-max position of each window += dy[n, c, i, j]; every other position gets 0.

    Tie rule: when several elements of a window share the maximum, only the first one in
    row-major order inside the window (smallest p, then smallest q) receives the gradient.
    Where windows overlap, an element that is the maximum of several windows receives the sum.
    NaN wins: a window holding a NaN gives y = NaN, and its first NaN in the same order receives the
    gradient (PyTorch's CPU kernel picks the last NaN; either way the output says the input was NaN).

Average pooling (padding counts as zeros in the average, as in PyTorch's default)::

    y[n, c, i, j] = (1 / (kH·kW)) · Σ_{p, q} x̃[n, c, i·sH + p, j·sW + q]
    dx̃[n, c, i·sH + p, j·sW + q] += dy[n, c, i, j] / (kH·kW)

Derivations: docs/derivations.md, "Pooling".

What runs is this code, unless a program asks for a kernel family (``tinybn.kernels.use("numba")``, as
``python -m tinybn`` and the examples do): then a compiled kernel of max pooling (stride = kernel, no padding, sizes divisible by the kernel) runs instead, on NumPy float32 and
float64 arrays (``tinybn/numba_kernels/pooling.py``, tested equal to this code). ``tinybn.kernels.active()`` says which family runs, and
``tinybn.ops.Recorder`` which implementation of which op ran.
"""
from __future__ import annotations

from .. import ops
from ..autograd import Cache, apply
from ..backend import get_array_module
from ._util import add_window_grads, crop_hw, output_size, pad_hw, pair, windows


def _pool_geometry(x, kernel_size, stride, padding):
    """``((kH, kW), (sH, sW), (pH, pW), (H_out, W_out))``, after checking that they fit x."""
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(kernel_size if stride is None else stride, "stride")
    ph, pw = pair(padding, "padding")
    if len(x.shape) != 4:
        raise ValueError(f"pooling expects an input of shape (N, C, H, W), got {tuple(x.shape)}")
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"pooling: kernel and stride must be positive and padding not negative, got kernel "
                         f"{(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"pooling padding {(ph, pw)} must be at most half the kernel size {(kh, kw)}")
    h, w = x.shape[2:]
    out_h, out_w = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"pooling: a {kh}x{kw} window with padding {(ph, pw)} does not fit an input of {h}x{w}")
    return (kh, kw), (sh, sw), (ph, pw), (out_h, out_w)


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    xp = get_array_module(x)
    (kh, kw), (sh, sw), (ph, pw), (out_h, out_w) = _pool_geometry(x, kernel_size, stride, padding)
    x_pad = pad_hw(x, ph, pw, value=-xp.inf)
    n, c = x.shape[:2]
    patches = windows(x_pad, kh, kw, sh, sw, out_h, out_w).reshape(n, c, out_h, out_w, kh * kw)
    argmax = patches.argmax(axis=-1)                    # first maximum: the tie rule above
    y = xp.take_along_axis(patches, argmax[..., None], axis=-1)[..., 0]
    cache = Cache(argmax=argmax, x_pad_shape=x_pad.shape, dtype=x.dtype, kernel=(kh, kw), stride=(sh, sw),
                  padding=(ph, pw))
    return y, cache


def max_pool2d_backward(dy, cache):
    xp = get_array_module(dy)
    kh, kw = cache.kernel
    k = xp.arange(kh * kw).reshape(kh, kw)
    # dpatch[n, c, i, j, p, q] = dy[n, c, i, j] where (p, q) is the window's arg-max, else 0
    dpatch = xp.where(cache.argmax[..., None, None] == k, dy[..., None, None], 0).astype(cache.dtype, copy=False)
    dx_pad = xp.zeros(cache.x_pad_shape, dtype=cache.dtype)
    add_window_grads(dx_pad, dpatch, kh, kw, *cache.stride, *dy.shape[2:])
    return (crop_hw(dx_pad, *cache.padding),)


ops.define("max_pool2d", max_pool2d_forward, max_pool2d_backward)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max pooling; see the module docstring for the gradient's tie rule."""
    _pool_geometry(x, kernel_size, stride, padding)     # bad shapes fail here, for every kernel
    return apply("max_pool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0):
    (kh, kw), (sh, sw), (ph, pw), (out_h, out_w) = _pool_geometry(x, kernel_size, stride, padding)
    x_pad = pad_hw(x, ph, pw)
    y = windows(x_pad, kh, kw, sh, sw, out_h, out_w).mean(axis=(-2, -1))
    cache = Cache(x_pad_shape=x_pad.shape, dtype=x.dtype, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw))
    return y, cache


def avg_pool2d_backward(dy, cache):
    xp = get_array_module(dy)
    kh, kw = cache.kernel
    dx_pad = xp.zeros(cache.x_pad_shape, dtype=cache.dtype)
    dpatch = xp.broadcast_to((dy / (kh * kw))[..., None, None], dy.shape + (kh, kw))
    add_window_grads(dx_pad, dpatch, kh, kw, *cache.stride, *dy.shape[2:])
    return (crop_hw(dx_pad, *cache.padding),)


ops.define("avg_pool2d", avg_pool2d_forward, avg_pool2d_backward)


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average pooling; zero padding counts in the average."""
    return apply("avg_pool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)
