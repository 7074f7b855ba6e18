"""Every functional op against PyTorch in float64, over generated inputs (skipped without PyTorch).

For each op Hypothesis draws the shapes (batch and channels from 1, height and width from the kernel
size up), the kernel, stride and padding, the mode, a memory layout for every input and a seed for the
values; tinybn runs the op (on the readable reference, and on each installed kernel family), and its
output and the gradient of every input, under a random upstream gradient, must match PyTorch's.
"""
import numpy
import pytest
from hypothesis import example, given, strategies as st

import tinybn
from tinybn import functional as F, kernels

from props import LAYOUTS, assert_close, budget, with_layout

torch = pytest.importorskip("torch")

IMPLEMENTATIONS = tuple(kernels.available())
FASTEST = IMPLEMENTATIONS[-1]
layouts = st.sampled_from(LAYOUTS)


def implementation(name):
    return kernels.using(name)


def run_both(tinybn_op, torch_op, inputs, impl, seed, *, rtol=1e-9, atol=1e-9):
    """``inputs``: (name, array, layout, requires_grad). Compares the output and every requested gradient."""
    rng = numpy.random.default_rng(seed + 1)
    tensors = [tinybn.Tensor(with_layout(a, layout) if layout else a, requires_grad=g) for _, a, layout, g in inputs]
    with implementation(impl):
        out = tinybn_op(*tensors)
        dy = rng.standard_normal(out.shape)
        out.backward(dy)
    references = [torch.tensor(numpy.ascontiguousarray(a), requires_grad=g) for _, a, _, g in inputs]
    expected = torch_op(*references)
    expected.backward(torch.tensor(dy))
    assert_close("output", out.numpy(), expected.detach().numpy(), rtol, atol)
    for (name, _, _, needs), mine, theirs in zip(inputs, tensors, references):
        if needs:
            assert_close(f"gradient of {name}", mine.grad, theirs.grad.numpy(), rtol, atol)


@st.composite
def conv_cases(draw):
    n, c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), kh - 2 * ph + 6))   # kernel = (padded) input included
    w = draw(st.integers(max(1, kw - 2 * pw), kw - 2 * pw + 6))
    return dict(shape=(n, c_in, h, w), weight=(c_out, c_in, kh, kw), stride=(sh, sw), padding=(ph, pw),
                bias=draw(st.booleans()), x_needs=draw(st.booleans()))


@budget(150)
@given(case=conv_cases(), layout=layouts, impl=st.sampled_from(IMPLEMENTATIONS), seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 1, 28, 28), weight=(6, 1, 5, 5), stride=(1, 1), padding=(0, 0), bias=True, x_needs=False),
         layout="contiguous", impl=FASTEST, seed=0)                          # one image through LeNet's first conv
@example(case=dict(shape=(1, 2, 3, 3), weight=(2, 2, 3, 3), stride=(1, 1), padding=(0, 0), bias=False, x_needs=True),
         layout="size1_strides", impl=FASTEST, seed=1)                       # kernel = input, batch of one
def test_conv2d_matches_torch(case, layout, impl, seed):
    rng = numpy.random.default_rng(seed)
    inputs = [("x", rng.standard_normal(case["shape"]), layout, case["x_needs"]),
              ("weight", rng.standard_normal(case["weight"]), None, True)]
    if case["bias"]:
        inputs.append(("bias", rng.standard_normal(case["weight"][0]), None, True))
    run_both(lambda x, w, b=None: F.conv2d(x, w, b, stride=case["stride"], padding=case["padding"]),
             lambda x, w, b=None: torch.nn.functional.conv2d(x, w, b, stride=case["stride"], padding=case["padding"]),
             inputs, impl, seed)


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), kh - 2 * ph + 7))
    w = draw(st.integers(max(1, kw - 2 * pw), kw - 2 * pw + 7))
    return dict(shape=(draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w), kernel=(kh, kw), stride=stride,
                padding=(ph, pw))


@budget(150)
@given(case=pool_cases(), layout=layouts, impl=st.sampled_from(IMPLEMENTATIONS), seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 1, 4, 4), kernel=(2, 2), stride=None, padding=(0, 0)), layout="batch_last", impl=FASTEST,
         seed=0)
def test_max_pool2d_matches_torch(case, layout, impl, seed):
    x = numpy.random.default_rng(seed).standard_normal(case["shape"])
    stride = case["stride"] or case["kernel"]
    run_both(lambda t: F.max_pool2d(t, case["kernel"], case["stride"], case["padding"]),
             lambda t: torch.nn.functional.max_pool2d(t, case["kernel"], stride, case["padding"]),
             [("x", x, layout, True)], impl, seed)


@budget(100)
@given(case=pool_cases(), layout=layouts, impl=st.sampled_from(IMPLEMENTATIONS), seed=st.integers(0, 2**32 - 1))
def test_avg_pool2d_matches_torch(case, layout, impl, seed):
    x = numpy.random.default_rng(seed).standard_normal(case["shape"])
    stride = case["stride"] or case["kernel"]
    run_both(lambda t: F.avg_pool2d(t, case["kernel"], case["stride"], case["padding"]),
             lambda t: torch.nn.functional.avg_pool2d(t, case["kernel"], stride, case["padding"], count_include_pad=True),
             [("x", x, layout, True)], impl, seed)


@st.composite
def batch_norm_cases(draw):
    four_d = draw(st.booleans())
    training = draw(st.booleans())
    n, c = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4))) if four_d else ()
    if training and n * int(numpy.prod(spatial)) == 1:
        n = 2                                   # one value per channel is refused in training (tested elsewhere)
    param_shape = draw(st.sampled_from([(c,), (1, c) if not four_d else (1, c, 1, 1)]))
    return dict(shape=(n, c, *spatial), param_shape=param_shape, training=training,
                momentum=draw(st.sampled_from([0.0, 0.1, 0.9, 1.0])), eps=draw(st.sampled_from([1e-5, 1e-3, 1e-12])),
                shift=draw(st.sampled_from([0.0, 3.0, 1e3])))


@budget(200)
@given(case=batch_norm_cases(), layout=layouts, impl=st.sampled_from(IMPLEMENTATIONS), seed=st.integers(0, 2**32 - 1))
@example(case=dict(shape=(1, 3, 1, 1), param_shape=(3,), training=False, momentum=0.9, eps=1e-5, shift=0.0),
         layout="size1_strides", impl=FASTEST, seed=0)                        # one image, one value per channel, eval
def test_batch_norm_matches_torch(case, layout, impl, seed):
    rng = numpy.random.default_rng(seed)
    shape, c = case["shape"], case["shape"][1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + case["shift"]
    gamma, beta = rng.uniform(0.5, 2.0, case["param_shape"]), rng.standard_normal(case["param_shape"])
    mean, var = rng.standard_normal(case["param_shape"]), rng.uniform(0.5, 2.0, case["param_shape"])
    eps = case["eps"]
    results = {}

    def mine(x, g, b):
        y, new_mean, new_var = F.batch_norm(x, g, b, mean, var, training=case["training"], momentum=case["momentum"],
                                            eps=eps)
        results.update(mean=new_mean.numpy(), var=new_var.numpy())
        return y

    def theirs(x, g, b):
        return torch.nn.functional.batch_norm(x, torch.tensor(mean.reshape(-1)), torch.tensor(var.reshape(-1)),
                                              g.reshape(-1), b.reshape(-1), training=case["training"], eps=eps)

    run_both(mine, theirs, [("x", x, layout, True), ("gamma", gamma, None, True), ("beta", beta, None, True)],
             impl, seed, rtol=1e-8, atol=1e-8)
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    if case["training"]:   # tinybn's convention: momentum weighs the old average, the batch variance is biased
        m = case["momentum"]
        assert_close("moving mean", results["mean"], m * mean + (1 - m) * x.mean(axis=axes).reshape(mean.shape))
        assert_close("moving var", results["var"], m * var + (1 - m) * x.var(axis=axes).reshape(var.shape))
    else:
        assert_close("moving mean", results["mean"], mean) and assert_close("moving var", results["var"], var)


@budget(60)
@given(n=st.integers(1, 5), d_in=st.integers(1, 6), d_out=st.integers(1, 5), bias=st.booleans(), layout=layouts,
       seed=st.integers(0, 2**32 - 1))
def test_linear_matches_torch(n, d_in, d_out, bias, layout, seed):
    rng = numpy.random.default_rng(seed)
    inputs = [("x", rng.standard_normal((n, d_in)), layout, True), ("weight", rng.standard_normal((d_out, d_in)),
                                                                    layout, True)]
    if bias:
        inputs.append(("bias", rng.standard_normal(d_out), None, True))
    run_both(F.linear, torch.nn.functional.linear, inputs, "reference", seed)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@budget(100)
@given(shape=shapes, layout=layouts, impl=st.sampled_from(IMPLEMENTATIONS), scale=st.sampled_from([1.0, 30.0, 800.0]),
       seed=st.integers(0, 2**32 - 1))
def test_sigmoid_matches_torch(shape, layout, impl, scale, seed):
    x = numpy.random.default_rng(seed).standard_normal(shape) * scale
    run_both(F.sigmoid, torch.sigmoid, [("x", x, layout, True)], impl, seed, atol=1e-12)


@budget(50)
@given(shape=shapes, layout=layouts, seed=st.integers(0, 2**32 - 1))
def test_relu_and_flatten_match_torch(shape, layout, seed):
    x = numpy.random.default_rng(seed).standard_normal(shape)
    run_both(F.relu, torch.relu, [("x", x, layout, True)], "reference", seed)
    if len(shape) >= 2:
        run_both(F.flatten, lambda t: torch.flatten(t, 1), [("x", x, layout, True)], "reference", seed)


@budget(60)
@given(n=st.integers(1, 6), classes=st.integers(1, 6), scale=st.sampled_from([1.0, 100.0, 1e4]), layout=layouts,
       seed=st.integers(0, 2**32 - 1))
def test_cross_entropy_matches_torch(n, classes, scale, layout, seed):
    rng = numpy.random.default_rng(seed)
    logits, labels = rng.standard_normal((n, classes)) * scale, rng.integers(0, classes, n)
    run_both(lambda z, t: F.cross_entropy(z, t), lambda z, t: torch.nn.functional.cross_entropy(z, t),
             [("logits", logits, layout, True), ("labels", labels, None, False)], "reference", seed)


@budget(50)
@given(shape=shapes, p=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), training=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_dropout_is_its_formula(shape, p, training, seed):
    """PyTorch cannot take a mask from outside, so the oracle is the formula with the mask tinybn drew."""
    x = numpy.random.default_rng(seed).standard_normal(shape)
    t = tinybn.Tensor(x, requires_grad=True)
    y = F.dropout(t, p, training, numpy.random.default_rng(seed))
    dy = numpy.random.default_rng(seed + 1).standard_normal(shape)
    y.backward(dy)
    if not training or p == 0.0:
        scale = numpy.ones(shape)
    elif p == 1.0:
        scale = numpy.zeros(shape)
    else:
        keep = numpy.random.default_rng(seed).random(shape) >= p
        scale = keep / (1.0 - p)
    assert_close("output", y.numpy(), x * scale, atol=0)
    assert_close("gradient", t.grad, dy * scale, atol=0)
