"""NumPy fast paths: the same forward/backward pairs as :mod:`tinybn.functional`, arranged for speed.

Each function here computes exactly what its namesake in ``tinybn/functional/`` computes (the tests
check this with :func:`tinybn.assert_same`); read the reference first for the mathematics. What
changes is only how the arrays are laid out and traversed:

* **Channel-major memory.** Outputs are allocated as (C, N, H, W) and handed back as the NCHW view
  ``.transpose(1, 0, 2, 3)``. Shapes and values are the usual NCHW ones; only the strides differ.
  Every per-channel block is then contiguous, so batch-norm statistics are plain row reductions,
  and a convolution's matrix product writes its result in place without a transpose.
* **Convolution on flattened rows** (stride 1). Each image channel, zero-padded to Hp×Wp, is stored
  as one flat row. A window offset (i, j) then shifts the whole row by ``i·Wp + j``, so im2col copies
  kH·kW long contiguous slices instead of N·C·H_out short ones, and col2im adds them back the same
  way. The price is computing Wp − W_out extra output columns per row, which are dropped. The batch
  goes through in cache-sized chunks, and the backward pass rebuilds them instead of keeping them.
* **Max pooling with kernel = stride** visits the kH·kW strided sub-grids of the input once each,
  tracking the first maximum's index while a graph is recorded.
* **Batch norm** keeps x (alive anyway) instead of x̂ and evaluates the closed-form backward in place.
* **In-place elementwise chains** (``out=``) instead of temporaries.

docs/fast-paths.md walks through each of these with the index arithmetic.
"""
from __future__ import annotations

import numpy as np

from ..functional._util import pair
from ..tensor import Cache, is_grad_enabled


def channel_major(x):
    """The (C, N, ...) view of an (N, C, ...) array; contiguous when x came from a fast path."""
    return x.swapaxes(0, 1)


def _as_nchw(channel_major_array):
    return channel_major_array.swapaxes(0, 1)


# ---------------------------------------------------------------------------------------------- conv2d


CHUNK_BYTES = 4 << 20   # im2col workspace per chunk of images: small enough to stay in the CPU caches


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, need_dx=True):
    """Stride-1 convolution; see :func:`tinybn.functional.conv.conv2d_forward`.

    The batch is processed a few images at a time: each chunk's im2col matrix is built in a small
    workspace and multiplied while it is still in cache. Only the padded input rows are kept for
    the backward pass, which rebuilds the chunks; storing the whole im2col matrix would cost
    kH·kW times the input's memory.
    """
    ph, pw = pair(padding, "padding")
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    out_h, out_w = hp - kh + 1, wp - kw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"conv2d: a {kh}x{kw} kernel with padding {(ph, pw)} does not fit an input of {h}x{w}")
    # each (channel, image) as one flat zero-padded row, with kw − 1 zeros of slack for the last window
    rows = np.zeros((c_in, n, hp * wp + kw - 1), x.dtype)
    rows[:, :, :hp * wp].reshape(c_in, n, hp, wp)[:, :, ph:ph + h, pw:pw + w] = channel_major(x)
    geometry = _RowConv(rows, weight, (out_h, out_w), wp)
    y = np.empty((c_out, n, out_h, out_w), x.dtype)
    y_wide_workspace = np.empty((c_out, geometry.chunk * geometry.length), x.dtype)
    bias_column = None if bias is None else bias.reshape(c_out, 1, 1, 1)
    for start, stop, cols in geometry.chunks():
        y_wide = np.matmul(geometry.weight_matrix, cols, out=y_wide_workspace[:, :(stop - start) * geometry.length])
        visible = y_wide.reshape(c_out, stop - start, out_h, wp)[..., :out_w]
        if bias_column is None:
            np.copyto(y[:, start:stop], visible)
        else:
            np.add(visible, bias_column, out=y[:, start:stop])
    cache = Cache(geometry=geometry, has_bias=bias is not None, padding=(ph, pw), in_hw=(h, w), need_dx=need_dx)
    return _as_nchw(y), cache


def conv2d_backward(dy, cache):
    geometry = cache.geometry
    weight = geometry.weight
    c_out, c_in, kh, kw = weight.shape
    out_h, out_w = geometry.out_hw
    wp, length = geometry.wp, geometry.length
    (ph, pw), (h, w) = cache.padding, cache.in_hw
    hp = h + 2 * ph
    dyc = channel_major(dy)
    dweight_t = np.zeros((c_in * kh * kw, c_out), dy.dtype)   # dWᵀ: BLAS is faster with the long axis inside
    dweight_chunk = np.empty_like(dweight_t)
    dy_wide = np.zeros((c_out, geometry.chunk, out_h, wp), dy.dtype)  # the dropped columns stay 0
    if cache.need_dx:
        dx = np.empty((c_in, dy.shape[0], h, w), dy.dtype)
        dcols = np.empty((c_in * kh * kw, geometry.chunk * length), dy.dtype)
        drows = np.empty((c_in, geometry.chunk, geometry.rows.shape[2]), dy.dtype)
    for start, stop, cols in geometry.chunks():
        count = stop - start
        dy_wide[:, :count, :, :out_w] = dyc[:, start:stop]
        dy_chunk = dy_wide[:, :count].reshape(c_out, count * length)
        dweight_t += np.matmul(cols, dy_chunk.T, out=dweight_chunk)
        if cache.need_dx:  # skipped for the first layer, whose input is data
            dcols_chunk = np.matmul(geometry.weight_matrix.T, dy_chunk, out=dcols[:, :count * length])
            dcols_chunk = dcols_chunk.reshape(c_in, kh, kw, count, length)
            drows_chunk = drows[:, :count]
            drows_chunk.fill(0)
            for i in range(kh):          # col2im: the shifted rows added back
                for j in range(kw):
                    shift = i * wp + j
                    drows_chunk[:, :, shift:shift + length] += dcols_chunk[:, i, j]
            np.copyto(dx[:, start:stop],
                      drows_chunk[:, :, :hp * wp].reshape(c_in, count, hp, wp)[:, :, ph:ph + h, pw:pw + w])
    dbias = np.ascontiguousarray(dyc).reshape(c_out, -1).sum(axis=1) if cache.has_bias else None
    return (_as_nchw(dx) if cache.need_dx else None), dweight_t.T.reshape(weight.shape), dbias


class _RowConv:
    """The im2col matrix of flattened rows, produced chunk by chunk.

    For the chunk of images [start, stop), column block ``n·length + p`` of row (c, i, j) holds
    ``rows[c, n, i·wp + j + p]``: one strided view of ``rows`` copied into a reused workspace.
    """

    def __init__(self, rows, weight, out_hw, wp):
        self.rows, self.weight, self.out_hw, self.wp = rows, weight, out_hw, wp
        c_out, c_in, kh, kw = weight.shape
        self.weight_matrix = weight.reshape(c_out, c_in * kh * kw)
        self.length = out_hw[0] * wp              # output rows, each wp wide (the last kw − 1 are dropped)
        per_image = c_in * kh * kw * self.length * rows.itemsize
        self.chunk = max(1, min(rows.shape[1], CHUNK_BYTES // per_image))

    def chunks(self):
        rows, (_, c_in, kh, kw) = self.rows, self.weight.shape
        workspace = np.empty(c_in * kh * kw * self.chunk * self.length, rows.dtype)
        step_c, step_n, step = rows.strides
        for start in range(0, rows.shape[1], self.chunk):
            stop = min(start + self.chunk, rows.shape[1])
            cols = workspace[:c_in * kh * kw * (stop - start) * self.length].reshape(c_in, kh, kw, stop - start,
                                                                                   self.length)
            # cols[c, i, j, n, p] = rows[c, start + n, i·wp + j + p]: overlapping reads, never past the slack
            view = np.lib.stride_tricks.as_strided(rows[:, start:], cols.shape,
                                                   (step_c, self.wp * step, step, step_n, step))
            np.copyto(cols, view)
            yield start, stop, cols.reshape(c_in * kh * kw, (stop - start) * self.length)


# ------------------------------------------------------------------------------------------ max_pool2d


def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Non-overlapping max pooling (stride = kernel, no padding, sizes divisible by the kernel).

    Visits the kH·kW strided sub-grids once each. When a graph is being recorded it also keeps, per
    window, the index of the first sub-grid that holds the maximum (the reference's tie rule): a
    later sub-grid takes over only if strictly greater, and its index is larger than any earlier one,
    so ``argmax = max(argmax, k·[v > y])`` tracks it without a branch.
    """
    kh, kw = pair(kernel_size, "kernel_size")
    xc = channel_major(x)
    c, n, h, w = xc.shape
    y = np.empty((c, n, h // kh, w // kw), x.dtype)
    np.copyto(y, xc[:, :, 0::kh, 0::kw])
    argmax = np.zeros(y.shape, np.uint8) if is_grad_enabled() and kh * kw < 256 else None
    if argmax is not None:
        greater, candidate = np.empty(y.shape, bool), np.empty(y.shape, np.uint8)
    for k in range(1, kh * kw):
        window = xc[:, :, k // kw::kh, k % kw::kw]
        if argmax is not None:
            np.greater(window, y, out=greater)
            np.multiply(greater, np.uint8(k), out=candidate)
            np.maximum(argmax, candidate, out=argmax)
        np.maximum(y, window, out=y)
    return _as_nchw(y), Cache(argmax=argmax, x=x, y=y, kernel=(kh, kw))


def max_pool2d_backward(dy, cache):
    """Route each dy to the first maximum of its window (row-major order), as the reference does."""
    kh, kw = cache.kernel
    dyc = channel_major(dy)
    c, n, out_h, out_w = cache.y.shape
    dx = np.empty((c, n, out_h * kh, out_w * kw), dy.dtype)
    hit = np.empty(cache.y.shape, bool)
    argmax = cache.argmax if cache.argmax is not None else _first_argmax(cache)
    for k in range(kh * kw):
        np.equal(argmax, k, out=hit)
        np.multiply(dyc, hit, out=dx[:, :, k // kw::kh, k % kw::kw])
    return (_as_nchw(dx),)


def _first_argmax(cache):
    """The argmax for a forward run without a graph (then differentiated by hand, e.g. in tests)."""
    kh, kw = cache.kernel
    xc = channel_major(cache.x)
    argmax = np.full(cache.y.shape, kh * kw - 1, np.int64)
    for k in reversed(range(kh * kw - 1)):
        argmax[xc[:, :, k // kw::kh, k % kw::kw] == cache.y] = k
    return argmax


# ------------------------------------------------------------------------------------------ batch_norm


def batch_norm_forward(x, gamma, beta, moving_mean, moving_var, training, momentum, eps):
    """4-D batch norm on channel-major rows; see :func:`tinybn.functional.batchnorm.batch_norm_forward`.

    The cache keeps x itself (the graph keeps it alive anyway) instead of x̂, which the backward
    pass recomputes: one more pass there, one activation-sized array less held between the passes.
    """
    c = x.shape[1]
    rows = np.ascontiguousarray(channel_major(x)).reshape(c, -1)   # no copy when x came from a fast path
    m = rows.shape[1]
    g, b = gamma.reshape(c, 1), beta.reshape(c, 1)
    if training:
        if m == 1:
            raise ValueError(f"batch_norm in training mode needs more than one value per channel, but an input of "
                             f"shape {tuple(x.shape)} has exactly one. Use a larger batch, or switch to eval mode.")
        mu = rows.mean(axis=1, keepdims=True)
        y = np.subtract(rows, mu)                       # x − μ, turned into y in place below
        var = _row_dot(y, y) / m                        # two-pass variance, as in the reference
        new_moving_mean = momentum * moving_mean + (1.0 - momentum) * mu.reshape(moving_mean.shape)
        new_moving_var = momentum * moving_var + (1.0 - momentum) * var.reshape(moving_var.shape)
        inv_std = 1.0 / np.sqrt(var + eps)
        y *= g * inv_std
        y += b
    else:
        mu = moving_mean.reshape(c, 1)
        inv_std = 1.0 / np.sqrt(moving_var.reshape(c, 1) + eps)
        scale = g * inv_std
        y = np.multiply(rows, scale)
        y += b - mu * scale
        new_moving_mean, new_moving_var = moving_mean, moving_var
    cache = Cache(rows=rows, mu=mu, inv_std=inv_std, gamma=g, training=training, x_shape=x.shape,
                  gamma_shape=gamma.shape, beta_shape=beta.shape)
    return (_as_nchw(y.reshape(c, x.shape[0], *x.shape[2:])), new_moving_mean, new_moving_var), cache


def batch_norm_backward(dy, cache):
    """The closed form of :func:`tinybn.functional.batchnorm.batch_norm_backward`, in place on x − μ."""
    c, m = cache.rows.shape
    inv_std, k = cache.inv_std, cache.gamma * cache.inv_std
    dy_rows = np.ascontiguousarray(channel_major(dy)).reshape(c, m)
    dbeta = dy_rows.sum(axis=1, keepdims=True)
    dx = np.subtract(cache.rows, cache.mu)                 # x − μ = x̂ / inv_std
    dgamma = _row_dot(dy_rows, dx) * inv_std                # Σ dy·x̂
    if cache.training:
        # dx = k·(dy − dβ/m − x̂·dγ/m) = k·((x − μ)·(−inv_std·dγ/m) + dy) − k·dβ/m
        dx *= -inv_std * dgamma / m
        dx += dy_rows
        dx *= k
        dx -= k * dbeta / m
    else:
        np.multiply(dy_rows, k, out=dx)
    n, _, h, w = cache.x_shape
    return (_as_nchw(dx.reshape(c, n, h, w)), dgamma.reshape(cache.gamma_shape), dbeta.reshape(cache.beta_shape),
            None, None)


def _row_dot(a, b):
    """Σ_j a[i, j]·b[i, j] for each row i, as a column (c, 1)."""
    return np.einsum("ij,ij->i", a, b).reshape(-1, 1)


# --------------------------------------------------------------------------------------------- sigmoid


def sigmoid_forward(x):
    """y = 1 / (1 + e^(−x)) in place; e^(−x) = inf for x < −88 (float32) gives exactly 0, the right limit."""
    y = np.negative(x)        # same memory order as x
    with np.errstate(over="ignore"):
        np.exp(y, out=y)
    y += 1.0
    np.reciprocal(y, out=y)
    return y, Cache(y=y)


def sigmoid_backward(dy, cache):
    y = cache.y
    dx = np.subtract(1.0, y)
    dx *= y
    dx *= dy
    return (dx,)

