"""Every kernel family against the readable reference, over generated inputs and memory layouts.

For each op a family has a kernel for, Hypothesis draws a case the kernel accepts (the test checks that it was
really the one that ran), a memory layout for every input and for the upstream gradient (C order,
channels-last, batch-last, Fortran, sliced, reversed, size-1 axes with arbitrary strides; each built
without a copy and its strides asserted), the dtype, batch 1 and one channel among the shapes, and 1 or 2
threads. Outputs and every input's gradient must equal the reference's (1e-12 relative in float64, rounding in
float32), and no input may change. Every family installed here is tested; the reference always is.
"""
import contextlib

import numpy
import pytest
from hypothesis import example, given, strategies as st

import tinybn
from tinybn import functional as F, kernels, ops

from props import LAYOUTS, assert_close, budget, with_layout

FAMILIES = kernels.available()[1:]
pytestmark = pytest.mark.skipif(not FAMILIES, reason="no kernel family is installed here (pip install -e '.[numba]')")
families = st.sampled_from(FAMILIES or ["reference"])
layouts = st.sampled_from(LAYOUTS)
dtypes = st.sampled_from(["float64", "float32"])


def tolerance(dtype, expected, condition=1.0):
    """1e-12 of the largest value in float64; float32's rounding, a few units in its last place, in float32.
    ``condition``: how much the op magnifies its inputs' rounding (batch norm of values 1e4 away from 0 with a
    spread of 1: 1e4), which any two correct orders of summation differ by."""
    scale = condition * (max(1.0, float(numpy.nanmax(numpy.abs(expected)))) if numpy.size(expected) else 1.0)
    return dict(rtol=1e-12, atol=1e-12 * scale) if dtype == "float64" else dict(rtol=2e-5, atol=2e-5 * scale)


@contextlib.contextmanager
def threads(count: int):
    saved = kernels._threads
    kernels.set_threads(count)
    try:
        yield
    finally:
        kernels.set_threads(saved)


@contextlib.contextmanager
def chosen_pairs():
    """The implementations that tinybn.autograd.apply ran, as the op registry's observers see them."""
    with ops.observe(ops.Recorder()) as recorder:
        chosen = []
        yield chosen
    chosen += [(implementation.op, implementation.label) for implementation, phase in recorder.calls
               if phase == "forward"]


def kernel_equals_reference(op, call, inputs, dy_layout, dtype, seed, family, thread_count, widen=None, condition=1.0):
    """``inputs``: (name, values, layout, requires_grad). ``widen``: a looser float32 tolerance where the case says
    why."""
    arrays = [with_layout(values.astype(dtype), layout) for _, values, layout, _ in inputs]
    before = [a.copy() for a in arrays]
    results = {}
    for impl in (family, "reference"):
        tensors = [tinybn.Tensor(a, requires_grad=needs) for a, (_, _, _, needs) in zip(arrays, inputs)]
        assert all(t.data is a for t, a in zip(tensors, arrays))             # the layout reaches the op
        with threads(thread_count), chosen_pairs() as chosen, kernels.using(impl):
            out = call(*tensors)
            dy = numpy.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
            out.backward(with_layout(dy, dy_layout))
        if impl == family:
            assert (op, family) in chosen, f"the {family} {op} did not run: {chosen}"
        results[impl] = out.numpy(), [t.grad for t in tensors]
    (out, grads), (ref_out, ref_grads) = results[family], results["reference"]
    assert_close("output", out, ref_out, **(widen or tolerance(dtype, ref_out, condition)))
    for (name, _, _, needs), mine, reference in zip(inputs, grads, ref_grads):
        if needs:
            assert_close(f"gradient of {name}", mine, reference, **(widen or tolerance(dtype, reference, condition)))
    for (name, *_), array, original in zip(inputs, arrays, before):
        numpy.testing.assert_array_equal(array, original, err_msg=f"{name} was changed")


thread_counts = st.integers(1, 2)


@st.composite
def conv_cases(draw):
    n, c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 11))     # kw past 5 and 10: the kernels take five columns at a time
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), kh - 2 * ph + 6))
    w = draw(st.integers(max(1, kw - 2 * pw), kw - 2 * pw + 6))
    return dict(shape=(n, c_in, h, w), weight=(c_out, c_in, kh, kw), padding=(ph, pw), bias=draw(st.booleans()),
                x_needs=draw(st.booleans()))


@budget(200)
@given(case=conv_cases(), x_layout=layouts, w_layout=layouts, dy_layout=layouts, dtype=dtypes, family=families, thread_count=thread_counts,
       seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 1, 28, 28), weight=(6, 1, 5, 5), padding=(0, 0), bias=True, x_needs=False),
         x_layout="batch_last", w_layout="contiguous", dy_layout="contiguous", dtype="float32", family=FAMILIES[0] if FAMILIES else 'reference', thread_count=2,
         seed=0)                                   # one image: the batch-last copy kept the NCHW batch stride
def test_kernel_conv2d_equals_reference(case, x_layout, w_layout, dy_layout, dtype, family, thread_count, seed):
    rng = numpy.random.default_rng(seed)
    inputs = [("x", rng.standard_normal(case["shape"]), x_layout, case["x_needs"]),
              ("weight", rng.standard_normal(case["weight"]), w_layout, True)]
    if case["bias"]:
        inputs.append(("bias", rng.standard_normal(case["weight"][0]), "contiguous", True))
    kernel_equals_reference("conv2d", lambda x, w, b=None: F.conv2d(x, w, b, padding=case["padding"]), inputs,
                          dy_layout, dtype, seed, family, thread_count)


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), kh * draw(st.integers(1, 4)), kw * draw(st.integers(1, 4)))
    return dict(shape=shape, kernel=(kh, kw), explicit_stride=draw(st.booleans()),
                nans=draw(st.sampled_from([0, 0, 0, 1, 3])), ties=draw(st.booleans()))


@budget(200)
@given(case=pool_cases(), layout=layouts, dy_layout=layouts, dtype=dtypes, family=families, thread_count=thread_counts,
       seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 1, 4, 4), kernel=(2, 2), explicit_stride=False, nans=3, ties=False), layout="contiguous",
         dy_layout="contiguous", dtype="float64", family=FAMILIES[0] if FAMILIES else 'reference', thread_count=1, seed=3)   # a NaN's window routes like NumPy's argmax
def test_kernel_max_pool2d_equals_reference(case, layout, dy_layout, dtype, family, thread_count, seed):
    rng = numpy.random.default_rng(seed)
    x = rng.integers(0, 3, case["shape"]).astype(float) if case["ties"] else rng.standard_normal(case["shape"])
    x.reshape(-1)[rng.choice(x.size, min(case["nans"], x.size), replace=False)] = numpy.nan
    stride = case["kernel"] if case["explicit_stride"] else None
    kernel_equals_reference("max_pool2d", lambda t: F.max_pool2d(t, case["kernel"], stride), [("x", x, layout, True)],
                          dy_layout, dtype, seed, family, thread_count)


@st.composite
def batch_norm_cases(draw):
    training, dense = draw(st.booleans()), draw(st.booleans())
    n, c, h, w = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if training and n * h * w == 1 or training and dense and n == 1:
        n = 2
    shape, param_shapes = ((n, c), [(c,), (1, c)]) if dense else ((n, c, h, w), [(c,), (1, c, 1, 1)])
    return dict(shape=shape, training=training, param_shape=draw(st.sampled_from(param_shapes)),
                shift=draw(st.sampled_from([0.0, 5.0, 1e4])), momentum=draw(st.sampled_from([0.0, 0.9, 1.0])))


@budget(200)
@given(case=batch_norm_cases(), layout=layouts, dy_layout=layouts, dtype=dtypes, family=families, thread_count=thread_counts,
       seed=st.integers(0, 2**32 - 1))
def test_kernel_batch_norm_equals_reference(case, layout, dy_layout, dtype, family, thread_count, seed):
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

    widen = None
    if dtype == "float32" and case["shift"] > 100:
        # μ ≈ 1e4 rounded to float32 is off by up to 5e-4, i.e. up to 0.1 % of σ in every x − μ, and the two
        # paths sum in different orders: they agree to that, not to float32's 1e-7
        widen = dict(rtol=3e-2, atol=3e-2)
    inputs = [("x", x, layout, True), ("gamma", rng.uniform(0.5, 2, ps), "contiguous", True),
              ("beta", rng.standard_normal(ps), "contiguous", True)]
    kernel_equals_reference("batch_norm", call, inputs, dy_layout, dtype, seed, family, thread_count, widen,
                            condition=1.0 + case["shift"])
    (mean_k, var_k), (ref_mean, ref_var) = moving["runs"]
    assert_close("moving mean", mean_k, ref_mean, **(widen or tolerance(dtype, ref_mean)))
    assert_close("moving var", var_k, ref_var, **(widen or tolerance(dtype, ref_var)))


@budget(150)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), layout=layouts, dy_layout=layouts,
       dtype=dtypes, family=families, thread_count=thread_counts, scale=st.sampled_from([1.0, 20.0, 200.0]), seed=st.integers(0, 2**32 - 1))
def test_kernel_sigmoid_equals_reference(shape, layout, dy_layout, dtype, family, thread_count, scale, seed):
    x = numpy.random.default_rng(seed).standard_normal(shape) * scale
    kernel_equals_reference("sigmoid", F.sigmoid, [("x", x, layout, True)], dy_layout, dtype, seed, family, thread_count)


@budget(100)
@given(leading=st.integers(1, 5).map(lambda n: (n,)), d_in=st.integers(1, 12),       # dW takes five inputs at a time
       d_out=st.integers(1, 5), bias=st.booleans(), x_needs=st.booleans(), x_layout=layouts, w_layout=layouts,
       dy_layout=layouts, dtype=dtypes, family=families, thread_count=thread_counts, seed=st.integers(0, 2**32 - 1))
def test_kernel_linear_equals_reference(leading, d_in, d_out, bias, x_needs, x_layout, w_layout, dy_layout, dtype,
                                      family, thread_count, seed):
    rng = numpy.random.default_rng(seed)
    inputs = [("x", rng.standard_normal((*leading, d_in)), x_layout, x_needs),
              ("weight", rng.standard_normal((d_out, d_in)), w_layout, True)]
    if bias:
        inputs.append(("bias", rng.standard_normal(d_out), "contiguous", True))
    kernel_equals_reference("linear", F.linear, inputs, dy_layout, dtype, seed, family, thread_count)



@budget(50)
@given(shape=st.lists(st.integers(1, 4), min_size=3, max_size=4).map(tuple), dtype=dtypes, family=families,
       seed=st.integers(0, 2**32 - 1))
def test_kernel_flatten_of_a_batch_last_input_equals_reference(shape, dtype, family, seed):
    x = numpy.random.default_rng(seed).standard_normal(shape)
    kernel_equals_reference("flatten", F.flatten, [("x", x, "batch_last", True)], "contiguous", dtype, seed, family, 1)
