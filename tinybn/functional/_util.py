"""Small helpers shared by the functional ops."""
from __future__ import annotations

import numpy


def pair(value, name: str) -> tuple[int, int]:
    """Accept an int or a pair of ints (for kernel size, stride, padding)."""
    def whole(v):
        return isinstance(v, (int, numpy.integer)) and not isinstance(v, bool)

    if whole(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(whole(v) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def windows(x_pad, kh: int, kw: int, sh: int, sw: int, out_h: int, out_w: int):
    """A strided view of every kh×kw window: shape (N, C, out_h, out_w, kh, kw), no copy.

    ``windows[n, c, i, j]`` is the patch ``x_pad[n, c, i*sh : i*sh+kh, j*sw : j*sw+kw]``.
    """
    from ..backend import get_array_module

    xp = get_array_module(x_pad)
    n, c, _, _ = x_pad.shape
    s_n, s_c, s_h, s_w = x_pad.strides
    return xp.lib.stride_tricks.as_strided(
        x_pad, shape=(n, c, out_h, out_w, kh, kw), strides=(s_n, s_c, s_h * sh, s_w * sw, s_h, s_w))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def pad_hw(x, ph: int, pw: int, value=0.0):
    """Pad the two spatial axes of an NCHW array."""
    if ph == 0 and pw == 0:
        return x
    from ..backend import get_array_module

    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="constant", constant_values=value)


def add_window_grads(dx_pad, dpatch, kh: int, kw: int, sh: int, sw: int, out_h: int, out_w: int):
    """col2im: add ``dpatch[..., i, j]`` (N, C, out_h, out_w, kh, kw) back onto the input positions.

    One strided slice per kernel offset (i, j): kh·kw vectorised additions instead of a scatter.
    """
    for i in range(kh):
        for j in range(kw):
            dx_pad[:, :, i:i + sh * out_h:sh, j:j + sw * out_w:sw] += dpatch[:, :, :, :, i, j]
    return dx_pad


def crop_hw(x_pad, ph: int, pw: int):
    h, w = x_pad.shape[2:]
    return x_pad[:, :, ph:h - ph, pw:w - pw]
