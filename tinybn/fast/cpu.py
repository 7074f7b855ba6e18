"""NumPy fast paths: the same forward/backward pairs as :mod:`tinybn.functional`, arranged for speed.

Each function here computes exactly what its namesake in ``tinybn/functional/`` computes (the tests
check this with :func:`tinybn.assert_same`); read the reference first for the mathematics. What
changes is only how the arrays are laid out and traversed:

* **Batch-last memory.** Outputs are allocated as (C, H, W, N) and handed back as the NCHW view
  ``.transpose(3, 0, 1, 2)``. Shapes and values are the usual NCHW ones; only the strides differ.
  Every channel is then one contiguous block, so batch-norm statistics are plain row reductions, and
  a whole image row of the batch, (W, N), is one contiguous run of W·N numbers, so the strided
  accesses of convolution and pooling move long runs instead of single elements.
* **Convolution as im2col + one product per chunk** (stride 1). In batch-last memory the window
  element (i, j) of every output in image row r is the contiguous run ``x[c, r + i, j : j + W_out, :]``;
  im2col copies kH·kW·H_out such runs per channel, the product writes straight into the output, and
  col2im adds the runs back. The output rows go through a few at a time, so each chunk's im2col
  matrix is still in cache when it is multiplied, and the backward pass rebuilds the chunks instead
  of keeping them.
* **Max pooling with kernel = stride** visits the kH·kW strided sub-grids of the input once each,
  tracking the first maximum's index while a graph is recorded.
* **Batch norm** keeps x (alive anyway) instead of x̂ and evaluates the closed-form backward in place.
* **In-place elementwise chains** (``out=``) instead of temporaries.
* **Pieces for the threads.** Each kernel cuts its work into independent pieces (ranges of channels,
  of memory, or im2col chunks) and hands them to :func:`tinybn.fast.parallel.map`, which shares them
  among the calling thread and resident workers (NumPy releases the GIL inside each call).

docs/fast-paths.md walks through each of these with the index arithmetic.
"""
from __future__ import annotations

import numpy as np

from ..functional._util import pair
from ..autograd import Cache
from . import parallel


def batch_last(x):
    """The (C, H, W, N) view of an (N, C, H, W) array; contiguous when x came from a fast path."""
    return x.transpose(1, 2, 3, 0)


def _as_nchw(batch_last_array):
    return batch_last_array.transpose(3, 0, 1, 2)


# ---------------------------------------------------------------------------------------------- conv2d


CHUNK_BYTES = 4 << 20    # im2col workspace per chunk of output rows: small enough to stay in the CPU caches
COL2IM_BYTES = 16 << 20  # col2im workspace per block of rows: larger (fewer, longer adds), still bounded


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """Stride-1 convolution; see :func:`tinybn.functional.conv.conv2d_forward`.

    In batch-last memory, output row r of channel o for the whole batch is
    ``y[o, r] = Σ_{c,i,j} W[o, c, i, j] · x̃[c, r + i, j : j + W_out, :]``, a product of the (C_out, C_in·kH·kW)
    weight matrix with kH·kW·C_in contiguous runs of W_out·N numbers. Only the padded input is kept for
    the backward pass, which rebuilds the im2col chunks; keeping them all would cost kH·kW times the
    input's memory.
    """
    ph, pw = pair(padding, "padding")
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    out_h, out_w = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1     # stride 1 (tinybn.functional.conv2d checked the fit)
    if ph or pw:
        x_pad = np.zeros((c_in, h + 2 * ph, w + 2 * pw, n), x.dtype)
        x_pad[:, ph:ph + h, pw:pw + w] = batch_last(x)
    else:
        x_pad = np.ascontiguousarray(batch_last(x))      # no copy when x came from a fast path
    im2col = _BatchLastIm2col(x_pad, weight.shape, (out_h, out_w))
    y = np.empty((c_out, out_h, out_w, n), x.dtype)
    y_rows = y.reshape(c_out, out_h * out_w * n)
    weight_matrix = weight.reshape(c_out, -1)

    def chunk(rows):
        start, stop = rows
        block = y_rows[:, start * im2col.run:stop * im2col.run]
        np.matmul(weight_matrix, im2col.columns(start, stop), out=block)
        if bias is not None:
            block += bias.reshape(c_out, 1)
    parallel.map(chunk, im2col.ranges())
    cache = Cache(im2col=im2col, weight=weight, has_bias=bias is not None, padding=(ph, pw))
    return _as_nchw(y), cache


def conv2d_backward(dy, cache):
    """dW from the rebuilt im2col chunks and dx by col2im, in pieces shared among the threads.

    A dW piece is one chunk's product ``dy_chunk · colsᵀ``, a partial dW (and its partial db); the
    partial sums are added in chunk order. A dx piece is a range of input channels, whose part of dx̃
    no other piece touches, so no two threads add into the same numbers; it goes through the output
    rows in blocks of at most ``COL2IM_BYTES``. The products use ``np.dot``, which releases the GIL around BLAS
    (``np.matmul`` held it for these shapes, and the threads queued behind each other).
    """
    im2col, weight = cache.im2col, cache.weight
    c_out, c_in, kh, kw = weight.shape
    run, out_h = im2col.run, im2col.out_hw[0]          # run = W_out·N: one output row of the batch
    n = dy.shape[0]
    dy_rows = np.ascontiguousarray(batch_last(dy)).reshape(c_out, -1)
    weight_matrix = weight.reshape(c_out, -1)
    need_dx = cache.needs(0)
    if need_dx:
        dx_pad = np.zeros(im2col.x_pad.shape, dy.dtype).reshape(c_in, im2col.x_pad.shape[1], -1)

    def dweight_piece(rows):   # (partial dW, partial db) of one chunk
        start, stop = rows
        dy_block = dy_rows[:, start * run:stop * run]
        return np.dot(dy_block, im2col.columns(start, stop).T), dy_block.sum(axis=1) if cache.has_bias else None

    def dx_piece(channels):
        c0, c1 = channels.start, channels.stop
        # contiguous: with a strided operand np.dot falls back to a slow loop that holds the GIL
        weight_t = np.ascontiguousarray(weight_matrix[:, c0 * kh * kw:c1 * kh * kw].T)
        rows_per_block = max(1, COL2IM_BYTES // ((c1 - c0) * kh * kw * run * dy.itemsize))
        for start in range(0, out_h, rows_per_block):
            stop = min(start + rows_per_block, out_h)
            dcols = im2col.workspace(start, stop, channels=c1 - c0)
            dcols = dcols.reshape((c1 - c0) * kh * kw, (stop - start) * run)
            np.dot(weight_t, dy_rows[:, start * run:stop * run], out=dcols)
            dcols = dcols.reshape(c1 - c0, kh, kw, stop - start, run)
            for i in range(kh):          # col2im: each run added back where im2col took it from
                for j in range(kw):
                    dx_pad[c0:c1, start + i:stop + i, j * n:j * n + run] += dcols[:, i, j]

    if need_dx:  # the dx pieces first: they are the longer ones
        tasks = [(dx_piece, channels) for channels in parallel.pieces(c_in)]
        tasks += [(dweight_piece, rows) for rows in im2col.ranges()]
        results = parallel.map(_call, tasks)
    else:               # the first layer: its input is data, and needs no gradient
        results = parallel.map(dweight_piece, im2col.ranges())
    partial = [result for result in results if result is not None]       # the dW pieces, in chunk order
    dweight, dbias = _in_order_sums(partial)
    dweight = dweight.reshape(weight.shape)
    if not need_dx:
        return None, dweight, dbias
    (ph, pw), (_, h, w, _) = cache.padding, im2col.x_pad.shape
    dx_pad = dx_pad.reshape(im2col.x_pad.shape)
    dx = dx_pad if not (ph or pw) else np.ascontiguousarray(dx_pad[:, ph:h - ph, pw:w - pw])
    return _as_nchw(dx), dweight, dbias


def _call(task):
    function, argument = task
    return function(argument)


class _BatchLastIm2col:
    """The im2col matrix of a padded batch-last input, produced a few output rows at a time.

    Row (c, i, j) of the chunk for output rows [start, stop) holds, for each of those rows r, the run
    ``x_pad[c, r + i, j : j + W_out, :]`` of W_out·N numbers: one strided view copied into a workspace.
    """

    def __init__(self, x_pad, weight_shape, out_hw):
        self.x_pad, self.weight_shape, self.out_hw = x_pad, weight_shape, out_hw
        _, c_in, kh, kw = weight_shape
        self.run = out_hw[1] * x_pad.shape[3]
        per_row = c_in * kh * kw * self.run * x_pad.itemsize
        chunks = -(-out_hw[0] * per_row // CHUNK_BYTES)           # ceiling division
        chunks = max(chunks, 2 * parallel.threads())              # enough pieces to share among the threads
        self.rows_per_chunk = max(1, -(-out_hw[0] // chunks))
        # The strides of a dense (C, H, W, N) block, from its shape: NumPy calls an array contiguous whatever
        # stride it keeps on an axis of size 1 (a batch of one keeps the NCHW batch stride), and the view
        # below steps along that axis W_out·N times, so reading x_pad.strides would leave the buffer.
        if not x_pad.flags.c_contiguous:
            raise ValueError("_BatchLastIm2col needs a C-contiguous (C, H, W, N) input")
        _, h, w, n = x_pad.shape
        step_c, step_h, step_w, step_n = (x_pad.itemsize * step for step in (h * w * n, w * n, n, 1))
        # windows[c, i, j, r, q] = x_pad[c, r + i, j + q // N, q % N]: (W, N) is one contiguous axis
        self.windows = np.lib.stride_tricks.as_strided(x_pad, (c_in, kh, kw, out_hw[0], self.run),
                                                       (step_c, step_h, step_w, step_h, step_n), writeable=False)

    def ranges(self):
        """The chunks, as (start, stop) ranges of output rows."""
        return [(start, min(start + self.rows_per_chunk, self.out_hw[0]))
                for start in range(0, self.out_hw[0], self.rows_per_chunk)]

    def columns(self, start, stop):
        """Output rows [start, stop) of the im2col matrix, (C_in·kH·kW, (stop − start)·W_out·N), freshly made."""
        _, c_in, kh, kw = self.weight_shape
        cols = self.workspace(start, stop)
        np.copyto(cols.reshape(c_in, kh, kw, stop - start, self.run), self.windows[:, :, :, start:stop])
        return cols.reshape(c_in * kh * kw, (stop - start) * self.run)

    def workspace(self, start, stop, channels=None):
        """An empty chunk-sized matrix, for ``channels`` of the input channels (default all)."""
        _, c_in, kh, kw = self.weight_shape
        return np.empty((channels or c_in) * kh * kw * (stop - start) * self.run, self.x_pad.dtype)


# ------------------------------------------------------------------------------------------ max_pool2d


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, recording=True):
    """Non-overlapping max pooling (stride = kernel, no padding, sizes divisible by the kernel).

    Visits the kH·kW strided sub-grids once each (in batch-last memory each step moves a run of N
    numbers). When a graph is being recorded (the engine says so: ``recording``) it also keeps, per
    window, the index of the first sub-grid that holds the maximum (the reference's tie rule): a later
    sub-grid takes over only if strictly greater, and its index is larger than any earlier one, so
    ``argmax = max(argmax, k·[v > y])`` tracks it without a branch.
    """
    kh, kw = pair(kernel_size, "kernel_size")
    xb = batch_last(x)
    c, h, w, n = xb.shape
    y = np.empty((c, h // kh, w // kw, n), x.dtype)
    argmax = np.zeros(y.shape, np.uint8) if recording and kh * kw < 256 else None

    def piece(channels):  # the threads take ranges of channels
        j = slice(channels.start, channels.stop)
        np.copyto(y[j], xb[j, 0::kh, 0::kw])
        if argmax is not None:
            greater, candidate = np.empty(y[j].shape, bool), np.empty(y[j].shape, np.uint8)
        for k in range(1, kh * kw):
            window = xb[j, k // kw::kh, k % kw::kw]
            if argmax is not None:
                np.greater(window, y[j], out=greater)
                np.multiply(greater, np.uint8(k), out=candidate)
                np.maximum(argmax[j], candidate, out=argmax[j])
            np.maximum(y[j], window, out=y[j])
    parallel.map(piece, _channel_pieces(c, x.size))
    if argmax is not None and np.isnan(y).any():
        # np.maximum spreads a NaN, but `window > y` is False against it: the reference (NumPy's argmax)
        # counts the first NaN of a window as its maximum
        argmax = _first_argmax(xb, y, (kh, kw), np.uint8)
    # x is kept only when the argmax was not: recomputing it is its one use
    return _as_nchw(y), Cache(argmax=argmax, x=x if argmax is None else None, y=y, kernel=(kh, kw))


def max_pool2d_backward(dy, cache):
    """Route each dy to the first maximum of its window (row-major order), as the reference does."""
    kh, kw = cache.kernel
    dyb = batch_last(dy)
    c, out_h, out_w, n = cache.y.shape
    dx = np.empty((c, out_h * kh, out_w * kw, n), dy.dtype)
    argmax = cache.argmax if cache.argmax is not None else _first_argmax(batch_last(cache.x), cache.y, cache.kernel)

    def piece(channels):
        j = slice(channels.start, channels.stop)
        hit = np.empty(cache.y[j].shape, bool)
        for k in range(kh * kw):
            np.equal(argmax[j], k, out=hit)
            np.multiply(dyb[j], hit, out=dx[j, k // kw::kh, k % kw::kw])
    parallel.map(piece, _channel_pieces(c, dx.size))
    return (_as_nchw(dx),)


def _first_argmax(xb, y, kernel, dtype=np.int64):
    """Per window, the index of the first sub-grid that holds its maximum y, a NaN counting as the maximum
    (as in NumPy's argmax). Used for a forward run without a graph (then differentiated by hand, e.g. in
    tests) and for windows with a NaN."""
    kh, kw = kernel
    argmax = np.full(y.shape, kh * kw - 1, dtype)
    y_is_nan = np.isnan(y)
    for k in reversed(range(kh * kw - 1)):
        window = xb[:, k // kw::kh, k % kw::kw]
        argmax[(window == y) | (np.isnan(window) & y_is_nan)] = k
    return argmax


# ------------------------------------------------------------------------------------------ batch_norm


def batch_norm_forward(x, gamma, beta, moving_mean, moving_var, training, eps):
    """4-D batch norm on batch-last rows; see :func:`tinybn.functional.batchnorm.batch_norm_forward`.

    The cache keeps x itself (the graph keeps it alive anyway) instead of x̂, which the backward
    pass recomputes: one more pass there, one activation-sized array less held between the passes.
    """
    c = x.shape[1]
    rows = np.ascontiguousarray(batch_last(x)).reshape(c, -1)   # no copy when x came from a fast path
    m = rows.shape[1]
    g, b = gamma.reshape(c, 1), beta.reshape(c, 1)
    y = np.empty_like(rows)
    mu, var = np.empty((c, 1), rows.dtype), np.empty((c, 1), rows.dtype)
    if not training:
        mu[...], var[...] = moving_mean.reshape(c, 1), moving_var.reshape(c, 1)
    inv_std = np.empty((c, 1), rows.dtype)

    def piece(channels):  # every channel is independent: the threads take ranges of channels
        k = slice(channels.start, channels.stop)
        if training:
            mu[k] = rows[k].mean(axis=1, keepdims=True)
            np.subtract(rows[k], mu[k], out=y[k])                     # x − μ, turned into y in place below
            var[k] = _row_dot(y[k], y[k]) / m                         # two-pass variance, as in the reference
            inv_std[k] = 1.0 / np.sqrt(var[k] + eps)
            y[k] *= g[k] * inv_std[k]
            y[k] += b[k]
        else:
            inv_std[k] = 1.0 / np.sqrt(var[k] + eps)
            scale = g[k] * inv_std[k]
            np.multiply(rows[k], scale, out=y[k])
            y[k] += b[k] - mu[k] * scale
    parallel.map(piece, _channel_pieces(c, rows.size))
    cache = Cache(rows=rows, mu=mu, inv_std=inv_std, gamma=g, training=training, x_shape=x.shape,
                  gamma_shape=gamma.shape, beta_shape=beta.shape)
    return (_as_nchw(y.reshape(c, *x.shape[2:], x.shape[0])), mu.reshape(-1), var.reshape(-1)), cache


def batch_norm_backward(dy, cache):
    """The closed form of :func:`tinybn.functional.batchnorm.batch_norm_backward`, in place on x − μ."""
    c, m = cache.rows.shape
    inv_std, k = cache.inv_std, cache.gamma * cache.inv_std
    dy_rows = np.ascontiguousarray(batch_last(dy)).reshape(c, m)
    dx = np.empty_like(cache.rows)
    dbeta, dgamma = np.empty((c, 1), dx.dtype), np.empty((c, 1), dx.dtype)

    def piece(channels):
        j = slice(channels.start, channels.stop)
        dbeta[j] = dy_rows[j].sum(axis=1, keepdims=True)
        np.subtract(cache.rows[j], cache.mu[j], out=dx[j])            # x − μ = x̂ / inv_std
        dgamma[j] = _row_dot(dy_rows[j], dx[j]) * inv_std[j]          # Σ dy·x̂
        if cache.training:
            # dx = k·(dy − dβ/m − x̂·dγ/m) = k·((x − μ)·(−inv_std·dγ/m) + dy) − k·dβ/m
            dx[j] *= -inv_std[j] * dgamma[j] / m
            dx[j] += dy_rows[j]
            dx[j] *= k[j]
            dx[j] -= k[j] * dbeta[j] / m
        else:
            np.multiply(dy_rows[j], k[j], out=dx[j])
    parallel.map(piece, _channel_pieces(c, dx.size))
    n, _, h, w = cache.x_shape
    return (_as_nchw(dx.reshape(c, h, w, n)), dgamma.reshape(cache.gamma_shape), dbeta.reshape(cache.beta_shape),
            None, None)


def _row_dot(a, b):
    """Σ_j a[i, j]·b[i, j] for each row i, as a column (c, 1).

    One BLAS dot product per row (``np.dot`` releases the GIL, so the threads' pieces run at once;
    ``np.vecdot`` holds it, and ``np.einsum`` is 3× slower here); einsum for many short rows, where the
    Python loop would cost more.
    """
    if a.shape[0] > 64:
        return np.einsum("ij,ij->i", a, b).reshape(-1, 1)
    return np.array([np.dot(a[i], b[i]) for i in range(a.shape[0])], dtype=a.dtype).reshape(-1, 1)


# --------------------------------------------------------------------------------------------- sigmoid


def sigmoid_forward(x):
    """y = 1 / (1 + e^(−x)), one piece of memory per thread.

    Below x ≈ −88.7 (float32; −709.8 in float64) e^(−x) overflows to inf and y is exactly 0, as in PyTorch,
    where the reference computes e^x / (1 + e^x) and returns the subnormal e^x down to x ≈ −103.3: the two
    differ by less than the smallest normal number (1.2e−38 in float32), far inside the tests' tolerance."""
    y = np.empty_like(x)                                  # the same memory order as x
    y_flat = _flat(y)
    x_flat = _flat(x) if x.strides == y.strides else None
    if x_flat is None:                                    # a strided view: negate it in one pass first
        np.negative(x, out=y)

    def piece(span):
        part = y_flat[span.start:span.stop]
        if x_flat is not None:
            np.negative(x_flat[span.start:span.stop], out=part)
        with np.errstate(over="ignore"):
            np.exp(part, out=part)
        part += 1.0
        np.divide(1.0, part, out=part)        # the same rounding as np.reciprocal, which NumPy does not vectorise
    parallel.map(piece, parallel.pieces(y_flat.size, PIECE_ELEMENTS))
    return y, Cache(y=y)


def sigmoid_backward(dy, cache):
    """dx = dy·y·(1 − y), one piece of memory per thread."""
    y = cache.y
    dx = np.empty_like(y)
    y_flat, dx_flat = _flat(y), _flat(dx)
    dy_flat = _flat(dy) if dy.strides == y.strides else None

    def piece(span):
        k = slice(span.start, span.stop)
        np.subtract(1.0, y_flat[k], out=dx_flat[k])
        dx_flat[k] *= y_flat[k]
        if dy_flat is not None:
            dx_flat[k] *= dy_flat[k]
    parallel.map(piece, parallel.pieces(y_flat.size, PIECE_ELEMENTS))
    if dy_flat is None:                                   # dy laid out differently from y: one more pass
        dx *= dy
    return (dx,)


# ---------------------------------------------------------------------------------------------- linear


def linear_forward(x, weight, bias=None):
    """``y = x Wᵀ + b`` by ranges of rows; see :func:`tinybn.functional.linear.linear_forward`.

    The products are pieces of :func:`parallel.map` like every other kernel's work, so OpenBLAS runs them on
    one thread per piece: left to its own threads, it keeps them spinning for about 0.1 s after each
    product, on the cores the fast kernels' threads need (the library's training step ran at half speed).
    """
    rows = x.reshape(-1, x.shape[-1])
    y = np.empty((rows.shape[0], weight.shape[0]), x.dtype)

    def piece(r):
        k = slice(r.start, r.stop)
        np.dot(rows[k], weight.T, out=y[k])
        if bias is not None:
            y[k] += bias
    parallel.map(piece, _product_pieces(rows.shape[0], weight.size))
    return y.reshape(*x.shape[:-1], weight.shape[0]), Cache(rows=rows, weight=weight, has_bias=bias is not None,
                                                             x_shape=x.shape)


def linear_backward(dy, cache):
    """dx = dy W by ranges of rows; dW = dyᵀ x and db = Σ dy as partial sums over the same ranges, added in order."""
    weight, rows = cache.weight, cache.rows
    dy_rows = np.ascontiguousarray(dy.reshape(-1, dy.shape[-1]))
    need_dx = cache.needs(0)
    dx = np.empty(rows.shape, rows.dtype) if need_dx else None      # C order: np.dot writes rows of it

    def piece(r):
        k = slice(r.start, r.stop)
        if need_dx:
            np.dot(dy_rows[k], weight, out=dx[k])
        return np.dot(dy_rows[k].T, rows[k]), dy_rows[k].sum(axis=0) if cache.has_bias else None
    partial = parallel.map(piece, _product_pieces(rows.shape[0], weight.size))
    dweight, dbias = _in_order_sums(partial)
    return (dx.reshape(cache.x_shape) if need_dx else None), dweight, dbias


def _in_order_sums(partial):
    """Σ of each column of [(dW, db), ...] (db may be None), added in piece order: the same bits every run."""
    dweight, dbias = partial[0]
    for dw, db in partial[1:]:
        dweight = dweight + dw
        dbias = None if dbias is None else dbias + db
    return dweight, dbias


# ------------------------------------------------------------------------------------------- helpers


PIECE_ELEMENTS = 1 << 15   # the smallest piece worth handing to another thread (a hand-off costs 20-100 µs)


def _channel_pieces(channels, size):
    """Ranges of channels for :func:`parallel.map` over an array of ``size`` numbers: one per thread, or
    a single range when the array is too small to be worth sharing."""
    if size < 2 * PIECE_ELEMENTS:
        return [range(channels)]
    return parallel.pieces(channels)


PRODUCT_WORK = 1 << 25     # multiply-adds below which a product is faster in one piece than shared out


def _product_pieces(rows, weight_size):
    """Ranges of rows for a product of ``rows`` rows with a weight of ``weight_size`` numbers: one range (still
    run under :func:`parallel.map`, for its one OpenBLAS thread) unless the product is large enough to share.
    LeNet's dense layers at batch 256 (7.9M multiply-adds at most) lost about 0.3 ms per step when split."""
    if rows * weight_size < PRODUCT_WORK:
        return [range(rows)]
    return parallel.pieces(rows)


def _flat(a):
    """The 1-D view of ``a``'s numbers in memory order, or None when they are not one dense block."""
    order = sorted(range(a.ndim), key=lambda axis: -a.strides[axis])
    dense = a.transpose(order)
    return dense.reshape(-1) if dense.flags.c_contiguous else None

