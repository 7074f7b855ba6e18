"""Every fast path against the readable reference, over generated inputs and memory layouts.

For each op with a fast path, Hypothesis draws a case the fast path accepts (the test checks that it was
really the one that ran), a memory layout for every input and for the upstream gradient (C order,
channels-last, batch-last, Fortran, sliced, reversed, size-1 axes with arbitrary strides; each built
without a copy and its strides asserted), the dtype, and how the work is cut among 1-3 threads. Outputs
and every input's gradient must equal the reference's, and no input may change.
"""
import contextlib

import numpy
from hypothesis import example, given, strategies as st

import tinybn
from tinybn import fast, functional as F, ops

from props import LAYOUTS, assert_close, budget, with_layout

layouts = st.sampled_from(LAYOUTS)
dtypes = st.sampled_from(["float64", "float32"])
TOLERANCE = {"float64": dict(rtol=1e-10, atol=1e-10), "float32": dict(rtol=2e-4, atol=2e-5)}


@contextlib.contextmanager
def threads(count: int, smallest_pieces: bool):
    """``count`` threads all taking pieces; with ``smallest_pieces`` the work is cut as finely as it goes
    (im2col and col2im one output row at a time), so even these small arrays exercise the threaded code."""
    saved = {name: getattr(fast.cpu, name) for name in ("PIECE_ELEMENTS", "CHUNK_BYTES", "COL2IM_BYTES", "PRODUCT_WORK")}
    saved_threads, saved_cores = fast.parallel.threads(), fast.parallel._cores
    try:
        if smallest_pieces:
            for name in saved:
                setattr(fast.cpu, name, 1)
        fast.parallel._cores = lambda: count
        fast.parallel.set_threads(count)
        yield
    finally:
        for name, value in saved.items():
            setattr(fast.cpu, name, value)
        fast.parallel._cores = saved_cores
        fast.parallel.set_threads(saved_threads)


@contextlib.contextmanager
def chosen_pairs():
    """The forward functions that tinybn.autograd.apply ran, as the op registry's observers see them."""
    with ops.observe(ops.Recorder()) as recorder:
        chosen = []
        yield chosen
    chosen += [implementation.forward for implementation, phase in recorder.calls if phase == "forward"]


def fast_equals_reference(op, call, inputs, dy_layout, dtype, seed, pieces, tolerance=None):
    """``inputs``: (name, values, layout, requires_grad)."""
    tolerance = tolerance or TOLERANCE[dtype]
    arrays = [with_layout(values.astype(dtype), layout) for _, values, layout, _ in inputs]
    before = [a.copy() for a in arrays]
    results = {}
    for impl in ("fast", "reference"):
        tensors = [tinybn.Tensor(a, requires_grad=needs) for a, (_, _, _, needs) in zip(arrays, inputs)]
        assert all(t.data is a for t, a in zip(tensors, arrays))             # the layout reaches the op
        with threads(*pieces), chosen_pairs() as chosen, (contextlib.nullcontext() if impl == "fast"
                                                          else fast.disabled()):
            out = call(*tensors)
            dy = numpy.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
            out.backward(with_layout(dy, dy_layout))
        if impl == "fast":
            assert getattr(fast.cpu, f"{op}_forward") in chosen, f"the fast {op} did not run: {chosen}"
        results[impl] = out.numpy(), [t.grad for t in tensors]
    (fast_out, fast_grads), (ref_out, ref_grads) = results["fast"], results["reference"]
    assert_close("output", fast_out, ref_out, **tolerance)
    for (name, _, _, needs), mine, reference in zip(inputs, fast_grads, ref_grads):
        if needs:
            assert_close(f"gradient of {name}", mine, reference, **tolerance)
    for (name, *_), array, original in zip(inputs, arrays, before):
        numpy.testing.assert_array_equal(array, original, err_msg=f"{name} was changed")


pieces = st.tuples(st.integers(1, 3), st.booleans())


@st.composite
def fast_conv_cases(draw):
    n, c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), kh - 2 * ph + 6))
    w = draw(st.integers(max(1, kw - 2 * pw), kw - 2 * pw + 6))
    return dict(shape=(n, c_in, h, w), weight=(c_out, c_in, kh, kw), padding=(ph, pw), bias=draw(st.booleans()),
                x_needs=draw(st.booleans()))


@budget(200)
@given(case=fast_conv_cases(), x_layout=layouts, w_layout=layouts, dy_layout=layouts, dtype=dtypes, pieces=pieces,
       seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 1, 28, 28), weight=(6, 1, 5, 5), padding=(0, 0), bias=True, x_needs=False),
         x_layout="batch_last", w_layout="contiguous", dy_layout="contiguous", dtype="float32", pieces=(2, False),
         seed=0)                                   # one image: the batch-last copy kept the NCHW batch stride
def test_fast_conv2d_equals_reference(case, x_layout, w_layout, dy_layout, dtype, pieces, seed):
    rng = numpy.random.default_rng(seed)
    inputs = [("x", rng.standard_normal(case["shape"]), x_layout, case["x_needs"]),
              ("weight", rng.standard_normal(case["weight"]), w_layout, True)]
    if case["bias"]:
        inputs.append(("bias", rng.standard_normal(case["weight"][0]), "contiguous", True))
    fast_equals_reference("conv2d", lambda x, w, b=None: F.conv2d(x, w, b, padding=case["padding"]), inputs,
                          dy_layout, dtype, seed, pieces)


@st.composite
def fast_pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), kh * draw(st.integers(1, 4)), kw * draw(st.integers(1, 4)))
    return dict(shape=shape, kernel=(kh, kw), explicit_stride=draw(st.booleans()),
                nans=draw(st.sampled_from([0, 0, 0, 1, 3])), ties=draw(st.booleans()))


@budget(200)
@given(case=fast_pool_cases(), layout=layouts, dy_layout=layouts, dtype=dtypes, pieces=pieces,
       seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 1, 4, 4), kernel=(2, 2), explicit_stride=False, nans=3, ties=False), layout="contiguous",
         dy_layout="contiguous", dtype="float64", pieces=(1, False), seed=3)   # a NaN's window routes like NumPy's argmax
def test_fast_max_pool2d_equals_reference(case, layout, dy_layout, dtype, pieces, seed):
    rng = numpy.random.default_rng(seed)
    x = rng.integers(0, 3, case["shape"]).astype(float) if case["ties"] else rng.standard_normal(case["shape"])
    x.reshape(-1)[rng.choice(x.size, min(case["nans"], x.size), replace=False)] = numpy.nan
    stride = case["kernel"] if case["explicit_stride"] else None
    fast_equals_reference("max_pool2d", lambda t: F.max_pool2d(t, case["kernel"], stride), [("x", x, layout, True)],
                          dy_layout, dtype, seed, pieces)


@st.composite
def fast_batch_norm_cases(draw):
    training = draw(st.booleans())
    n, c, h, w = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if training and n * h * w == 1:
        n = 2
    return dict(shape=(n, c, h, w), training=training, param_shape=draw(st.sampled_from([(c,), (1, c, 1, 1)])),
                shift=draw(st.sampled_from([0.0, 5.0, 1e4])), momentum=draw(st.sampled_from([0.0, 0.9, 1.0])))


@budget(200)
@given(case=fast_batch_norm_cases(), layout=layouts, dy_layout=layouts, dtype=dtypes, pieces=pieces,
       seed=st.integers(0, 2**32 - 1))
def test_fast_batch_norm_equals_reference(case, layout, dy_layout, dtype, pieces, seed):
    rng = numpy.random.default_rng(seed)
    shape, ps = case["shape"], case["param_shape"]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3) + case["shift"]
    mean, var = rng.standard_normal(ps) + case["shift"], rng.uniform(0.5, 2, ps)
    moving = {}

    def call(x, gamma, beta):
        y, new_mean, new_var = F.batch_norm(x, gamma, beta, mean.astype(dtype), var.astype(dtype),
                                            training=case["training"], momentum=case["momentum"])
        moving.setdefault("runs", []).append((new_mean.numpy(), new_var.numpy()))
        return y

    tolerance = dict(TOLERANCE[dtype])
    if dtype == "float32" and case["shift"] > 100:
        # μ ≈ 1e4 rounded to float32 is off by up to 5e-4, i.e. up to 0.1 % of σ in every x − μ, and the two
        # paths sum in different orders: they agree to that, not to float32's 1e-7
        tolerance = dict(rtol=3e-2, atol=3e-2)
    inputs = [("x", x, layout, True), ("gamma", rng.uniform(0.5, 2, ps), "contiguous", True),
              ("beta", rng.standard_normal(ps), "contiguous", True)]
    fast_equals_reference("batch_norm", call, inputs, dy_layout, dtype, seed, pieces, tolerance)
    (fast_mean, fast_var), (ref_mean, ref_var) = moving["runs"]
    assert_close("moving mean", fast_mean, ref_mean, **tolerance)
    assert_close("moving var", fast_var, ref_var, **tolerance)


@budget(150)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), layout=layouts, dy_layout=layouts,
       dtype=dtypes, pieces=pieces, scale=st.sampled_from([1.0, 20.0, 200.0]), seed=st.integers(0, 2**32 - 1))
def test_fast_sigmoid_equals_reference(shape, layout, dy_layout, dtype, pieces, scale, seed):
    x = numpy.random.default_rng(seed).standard_normal(shape) * scale
    fast_equals_reference("sigmoid", F.sigmoid, [("x", x, layout, True)], dy_layout, dtype, seed, pieces)


@budget(100)
@given(leading=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), d_in=st.integers(1, 6),
       d_out=st.integers(1, 5), bias=st.booleans(), x_needs=st.booleans(), x_layout=layouts, w_layout=layouts,
       dy_layout=layouts, dtype=dtypes, pieces=pieces, seed=st.integers(0, 2**32 - 1))
def test_fast_linear_equals_reference(leading, d_in, d_out, bias, x_needs, x_layout, w_layout, dy_layout, dtype,
                                      pieces, seed):
    rng = numpy.random.default_rng(seed)
    inputs = [("x", rng.standard_normal((*leading, d_in)), x_layout, x_needs),
              ("weight", rng.standard_normal((d_out, d_in)), w_layout, True)]
    if bias:
        inputs.append(("bias", rng.standard_normal(d_out), "contiguous", True))
    fast_equals_reference("linear", F.linear, inputs, dy_layout, dtype, seed, pieces)

