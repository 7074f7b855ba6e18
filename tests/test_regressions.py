"""One regression test per defect of "No silent wrong answers", each named after it.

Every one of these gave a wrong answer without any error (or hung, or crashed) on 6bb5e9f. The
property-based suites (test_properties_*.py) search the space around them; these pin the cases found.
"""
import contextlib
import threading

import numpy
import pytest

import tinybn
from tinybn import functional as F, nn
from tinybn.app.models import build_model
from tinybn.optim import SGD

rng = numpy.random.default_rng(9)


# 1. a batch of one through the fast conv2d -------------------------------------------------------------


@pytest.mark.parametrize("family", tinybn.kernels.available()[1:])
def test_kernel_conv2d_batch_of_one_reads_only_its_input(family):
    """The batch-last copy of a (1, C, H, W) input keeps the NCHW batch stride on its size-1 axis; the old fast
    im2col stepped along that axis and read outside the buffer (NaN, 1e30, or a segmentation fault)."""
    x, w, b = rng.standard_normal((1, 1, 28, 28)), rng.standard_normal((6, 1, 5, 5)), rng.standard_normal(6)
    with tinybn.kernels.using(family):
        y = F.conv2d(tinybn.tensor(x), tinybn.tensor(w), tinybn.tensor(b)).numpy()
    expected = F.conv2d(tinybn.tensor(x), tinybn.tensor(w), tinybn.tensor(b)).numpy()
    assert numpy.isfinite(y).all()
    numpy.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_lenet_bn_predicts_one_image_as_it_predicts_it_in_a_batch():
    net = build_model("lenet-bn")
    images = rng.random((8, 1, 28, 28)).astype(numpy.float32)
    net(tinybn.tensor(images))                       # one training step's statistics
    net.eval()
    with tinybn.no_grad():
        batch = net(tinybn.tensor(images)).numpy()
        alone = numpy.concatenate([net(tinybn.tensor(images[k:k + 1])).numpy() for k in range(8)])
    assert numpy.isfinite(alone).all()
    numpy.testing.assert_allclose(alone, batch, rtol=1e-4, atol=1e-5)


# 2. the concise model never trains gamma and beta ------------------------------------------------------


def test_concise_batch_norm_trains_gamma_and_beta_with_an_optimizer_built_first():
    tinybn.manual_seed(0)
    net = build_model("lenet-bn-concise")
    params = net.parameters()
    optimizer = SGD(params, lr=0.5)
    images, labels = rng.random((16, 1, 28, 28)).astype(numpy.float32), numpy.arange(16) % 10
    for _ in range(3):
        loss = F.cross_entropy(net(tinybn.tensor(images)), tinybn.tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [id(p) for p in net.parameters()] == [id(p) for p in params] and len(params) == 18
    gamma, beta = net[1].gamma.numpy(), net[1].beta.numpy()
    assert gamma.shape == (6,) and not numpy.allclose(gamma, 1.0) and not numpy.allclose(beta, 0.0)


def test_lazy_parameters_say_why_they_have_no_array_yet():
    layer = nn.BatchNorm2d()
    with pytest.raises(RuntimeError, match="infers it from the first input"):
        layer.gamma.shape
    with pytest.raises(RuntimeError, match="run one batch through the model first"):
        layer.state_dict()
    layer(tinybn.tensor(rng.standard_normal((2, 3, 4, 4)).astype(numpy.float32)))
    assert type(layer.gamma) is nn.Parameter and layer.gamma.shape == (3,)


def test_frozen_concise_gamma_stays_frozen_after_it_takes_its_size():
    layer = nn.BatchNorm1d()
    layer.gamma.requires_grad = False
    layer(tinybn.tensor(rng.standard_normal((4, 3)).astype(numpy.float32)))
    assert layer.gamma.requires_grad is False and layer.beta.requires_grad is True


def test_failed_load_state_dict_leaves_a_lazy_model_unchanged():
    source = build_model("lenet-bn-concise")
    source(tinybn.tensor(rng.random((2, 1, 28, 28)).astype(numpy.float32)))
    state = source.state_dict()
    state["4.weight"] = numpy.zeros((16, 6, 3, 3), numpy.float32)       # the second conv: a wrong shape
    target = build_model("lenet-bn-concise")
    with pytest.raises(ValueError, match=r"4.weight: expected \(16, 6, 5, 5\)"):
        target.load_state_dict(state)
    assert not any(nn.is_materialized(t) for t in (target[1].gamma, target[5].moving_var, target[10].beta))
    state = source.state_dict()
    state["5.gamma"] = numpy.ones(7, numpy.float32)                     # a lazy layer given an inconsistent size
    with pytest.raises(ValueError, match=r"5.beta: expected \(7,\), got \(16,\)"):
        target.load_state_dict(state)
    assert not nn.is_materialized(target[1].gamma)
    target.load_state_dict(source.state_dict())                          # the right state still loads
    source.eval(), target.eval()
    x = tinybn.tensor(rng.random((3, 1, 28, 28)).astype(numpy.float32))
    numpy.testing.assert_array_equal(target(x).numpy(), source(x).numpy())


# 3. a layer used twice is stepped twice ----------------------------------------------------------------


def test_shared_layer_parameters_are_listed_and_stepped_once():
    lin = nn.Linear(2, 2)
    net = nn.Sequential(lin, nn.Sigmoid(), lin)
    assert [name for name, _ in net.named_parameters()] == ["0.weight", "0.bias"]
    assert len(net.modules()) == 3
    before = lin.weight.numpy().copy()
    loss = net(tinybn.tensor(rng.standard_normal((3, 2)), dtype="float32")).sum()
    loss.backward()
    SGD(net.parameters(), lr=0.1).step()
    numpy.testing.assert_allclose(lin.weight.numpy(), before - 0.1 * lin.weight.grad, rtol=1e-6)


def test_shared_buffers_are_listed_once():
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(bn, nn.Sigmoid(), bn)
    assert [name for name, _ in net.named_buffers()] == ["0.moving_mean", "0.moving_var", "0.num_batches_tracked"]


# 4. transpose with negative axes -----------------------------------------------------------------------


@pytest.mark.parametrize("axes", [(-1, 0, 1), (2, -3, -2), (-1, -2, -3)])
def test_transpose_with_negative_axes_has_the_right_gradient(axes):
    x = tinybn.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    y = x.transpose(*axes)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    positive = tuple(a % 3 for a in axes)
    numpy.testing.assert_array_equal(y.numpy(), x.numpy().transpose(positive))
    numpy.testing.assert_array_equal(x.grad, dy.transpose(numpy.argsort(positive)))


# 5. the graph after backward() ------------------------------------------------------------------------


def test_reusing_an_intermediate_after_backward_is_an_error_not_a_silent_leaf():
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)
    h = x * 2.0
    (h * h).sum().backward()
    with pytest.raises(RuntimeError, match="graph was freed by an earlier backward.*retain_graph=True"):
        (h * 3.0).sum().backward()
    assert h.grad is None and not h.is_leaf
    numpy.testing.assert_array_equal(x.grad, [8.0, 16.0])      # unchanged by the refused call


def test_second_backward_is_an_error_or_counts_with_retain_graph():
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="graph was freed"):
        y.backward()
    z = (x * x).sum()
    x.zero_grad()
    z.backward(retain_graph=True)
    z.backward()
    numpy.testing.assert_array_equal(x.grad, [4.0, 8.0])      # 2 · 2x


# 6. gradients share memory -----------------------------------------------------------------------------


def test_each_leaf_owns_a_writable_gradient():
    a = tinybn.tensor([1.0, 2.0], requires_grad=True)
    b = tinybn.tensor([3.0, 4.0], requires_grad=True)
    g = numpy.array([1.0, 1.0], numpy.float32)
    (a + b).backward(g)
    assert a.grad is not b.grad and a.grad is not g
    a.grad *= 0.5
    numpy.testing.assert_array_equal(b.grad, [1.0, 1.0])
    numpy.testing.assert_array_equal(g, [1.0, 1.0])
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)
    x.sum().backward()
    x.grad *= 0.5                                             # was a read-only broadcast view
    numpy.testing.assert_array_equal(x.grad, [0.5, 0.5])
    leaf = tinybn.tensor([1.0, 2.0], requires_grad=True)
    upstream = numpy.ones(2, numpy.float32)
    leaf.backward(upstream)
    leaf.grad += 1
    numpy.testing.assert_array_equal(upstream, [1.0, 1.0])


def test_leaf_gradients_take_the_leaf_dtype():
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)                # float32
    (x * 2.0).backward(numpy.ones(2, numpy.float64))
    assert x.grad.dtype == numpy.float32


# 7. in-place changes between forward and backward ------------------------------------------------------


def test_changing_a_cached_array_in_place_before_backward_is_an_error():
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)
    w = tinybn.tensor([3.0, 4.0], requires_grad=True)
    y = (x * w).sum()
    w.data += 10
    with pytest.raises(RuntimeError, match="changed in place after the forward pass"):
        y.backward()
    assert x.grad is None and w.grad is None


def test_an_optimizer_step_between_forward_and_backward_is_an_error():
    lin = nn.Linear(2, 2)
    optimizer = SGD(lin.parameters(), lr=0.1)
    first = lin(tinybn.tensor(rng.standard_normal((3, 2)), dtype="float32")).sum()
    second = lin(tinybn.tensor(rng.standard_normal((3, 2)), dtype="float32")).sum()
    first.backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="changed in place"):
        second.backward()


def test_replacing_data_is_not_an_in_place_change():
    """``t.data = new_array`` leaves the cached old array intact, so the gradient is still right."""
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)
    w = tinybn.tensor([3.0, 4.0], requires_grad=True)
    y = (x * w).sum()
    w.data = w.data + 10
    y.backward()
    numpy.testing.assert_array_equal(x.grad, [3.0, 4.0])


# 8. grad mode is process-global; decorators break when re-entered --------------------------------------


def test_grad_mode_belongs_to_each_thread():
    inside, release = threading.Event(), threading.Event()

    def predict():
        with tinybn.no_grad():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=predict)
    thread.start()
    try:
        assert inside.wait(10)
        assert tinybn.is_grad_enabled()
        x = tinybn.tensor([1.0, 2.0], requires_grad=True)
        (x * x).sum().backward()
        numpy.testing.assert_array_equal(x.grad, [2.0, 4.0])
    finally:
        release.set()
        thread.join()


def test_recursive_no_grad_function_restores_grad_mode():
    @tinybn.no_grad()
    def depth(n):
        assert not tinybn.is_grad_enabled()
        return depth(n - 1) if n else 0

    depth(3)
    assert tinybn.is_grad_enabled()


def test_one_grad_mode_object_entered_twice_restores_what_it_found():
    mode = tinybn.no_grad()
    with mode:
        with tinybn.enable_grad():
            with mode:
                assert not tinybn.is_grad_enabled()
            assert tinybn.is_grad_enabled()
        assert not tinybn.is_grad_enabled()
    assert tinybn.is_grad_enabled()


def test_no_grad_generator_runs_every_step_without_a_graph():
    @tinybn.no_grad()
    def steps(x):
        for _ in range(3):
            yield x * 2.0

    x = tinybn.tensor([1.0], requires_grad=True)
    assert [y.requires_grad for y in steps(x)] == [False, False, False]
    assert tinybn.is_grad_enabled()


# 9. float16 batch norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, scale", [((256, 2, 16, 16), 1.0), ((64, 3, 8, 8), 200.0), ((4096, 3), 1.0)])
def test_float16_batch_norm_is_standardized_and_matches_float64(shape, scale):
    """The fast batch norm cast m = 65,536 to float16 (inf), so the variance was 0 and the output's std 29-125;
    and a float16 square overflows once |x − μ| > 256. Statistics are now computed in float32."""
    x = (rng.standard_normal(shape) * scale + 5).astype(numpy.float16)
    c = shape[1]
    gamma = tinybn.tensor(numpy.ones(c, numpy.float16), requires_grad=True)
    beta = tinybn.tensor(numpy.zeros(c, numpy.float16), requires_grad=True)
    xt = tinybn.tensor(x, requires_grad=True)
    y, mean, var = F.batch_norm(xt, gamma, beta, numpy.zeros(c, numpy.float16), numpy.ones(c, numpy.float16),
                                training=True, momentum=0.0)
    dy = rng.standard_normal(shape)
    y.backward(dy.astype(numpy.float16))
    assert y.dtype == mean.dtype == xt.grad.dtype == gamma.grad.dtype == numpy.float16
    x64, axes = x.astype(numpy.float64), (0,) if len(shape) == 2 else (0, 2, 3)
    mu, sigma2 = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    expected = (x64 - mu) / numpy.sqrt(sigma2 + 1e-5)
    numpy.testing.assert_allclose(y.numpy().std(axis=axes, dtype=numpy.float64), 1.0, rtol=2e-3)
    numpy.testing.assert_allclose(y.numpy(), expected, atol=4e-3 * max(1.0, numpy.abs(expected).max() / 4))
    numpy.testing.assert_allclose(var.numpy(), sigma2.reshape(-1), rtol=2e-3)
    d = dy.astype(numpy.float16).astype(numpy.float64)
    expected_dx = (d - d.mean(axis=axes, keepdims=True)
                   - expected * (d * expected).mean(axis=axes, keepdims=True)) / numpy.sqrt(sigma2 + 1e-5)
    numpy.testing.assert_allclose(xt.grad, expected_dx, atol=2e-3 * numpy.abs(expected_dx).max())


# 13. comparisons, `in`, and NaN in fast max pooling ----------------------------------------------------


def test_tensor_comparisons_are_elementwise():
    a, b = tinybn.tensor([1.0, 2.0]), tinybn.tensor([3.0, 2.0])
    numpy.testing.assert_array_equal((a != b).numpy(), [True, False])
    numpy.testing.assert_array_equal((a <= b).numpy(), [True, True])
    numpy.testing.assert_array_equal((a >= b).numpy(), [False, True])
    assert bool(tinybn.tensor([1.0]) != tinybn.tensor([3.0]))


def test_membership_compares_values_or_refuses():
    one, other = tinybn.tensor([1.0]), tinybn.tensor([2.0])
    assert one not in [other] and one in [other, one] and tinybn.tensor([2.0]) in [other]
    with pytest.raises(RuntimeError, match="ambiguous"):
        tinybn.tensor([1.0, 2.0]) in [tinybn.tensor([3.0, 4.0])]
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(tinybn.tensor([1.0, 2.0]))


@pytest.mark.parametrize("nan_at", [[(0, 1)], [(0, 1), (1, 0)], [(1, 1), (0, 0)], [(2, 3), (3, 2), (0, 2)]])
def test_kernel_max_pool_routes_a_nan_window_like_the_reference(nan_at):
    """NumPy's argmax (the reference) counts a window's first NaN as its maximum; a fast path kept the sub-grid
    it had before the NaN, so the gradient went elsewhere."""
    x = rng.permutation(16).astype(float).reshape(1, 1, 4, 4)
    for i, j in nan_at:
        x[0, 0, i, j] = numpy.nan
    dy = rng.standard_normal((1, 1, 2, 2))
    grads = []
    for family in tinybn.kernels.available():
        t = tinybn.tensor(x, requires_grad=True)
        with tinybn.kernels.using(family):
            y = F.max_pool2d(t, 2)
        y.backward(dy)
        grads.append(t.grad)
    for grad in grads[1:]:
        numpy.testing.assert_array_equal(grad, grads[0])


_USE_TINYBN = r"""
import ctypes
malloc_options = []                       # every lookup of glibc's mallopt through ctypes, from here on
_lookup = ctypes.CDLL.__getattr__
def _watch(library, name):
    if name == "mallopt":
        malloc_options.append(name)
    return _lookup(library, name)
ctypes.CDLL.__getattr__ = _watch
import numpy, threadpoolctl
def blas_threads():
    return {(pool["internal_api"], pool["filepath"]): pool["num_threads"] for pool in threadpoolctl.threadpool_info()}
found = (blas_threads(), numpy.get_printoptions(), numpy.geterr())
import matplotlib
backend = matplotlib.get_backend()
import tinybn
from tinybn.app.train import TrainConfig, train
assert (blas_threads(), numpy.get_printoptions(), numpy.geterr()) == found, "import tinybn changed something"
tinybn.kernels.use("fastest")
rng = numpy.random.default_rng(0)
data = (rng.integers(0, 256, (600, 1, 28, 28), numpy.uint8), rng.integers(0, 10, 600),
        rng.integers(0, 256, (200, 1, 28, 28), numpy.uint8), rng.integers(0, 10, 200))
import sys, tempfile
with tempfile.TemporaryDirectory() as out:
    train(TrainConfig(epochs=1, batch_size=64, out=out, progress=False, plot=True), log=lambda *a: None, data=data)
pools = {pool: threads for pool, threads in blas_threads().items() if pool in found[0]}   # numba adds its own,
after = (pools, numpy.get_printoptions(), numpy.geterr())                            # listed in any order
assert after == found, (found, after)
assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())
assert not malloc_options, "mallopt was looked up"
print("unchanged", found[0])
"""


def test_using_tinybn_from_python_leaves_blas_numpy_allocator_and_matplotlib_as_found():
    """The first fast op once put NumPy's OpenBLAS on one thread for the whole process and changed glibc's mallopt
    thresholds; train() changed NumPy's print options and matplotlib's backend. With the fastest kernels, nothing
    outside tinybn changes: not BLAS's threads, not the allocator (nothing looks up mallopt any more)."""
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("matplotlib")
    import os
    import subprocess
    import sys

    env = dict(os.environ, MPLBACKEND="svg")      # a backend train() would notice if it switched to Agg
    done = subprocess.run([sys.executable, "-c", _USE_TINYBN], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("unchanged")


# gradcheck perturbs through indices ---------------------------------------------------------------------


def _define_double(name, rule):
    """The op y = 2x, with a backward that returns ``rule(dy)`` (right only for dy · 2)."""
    from tinybn import ops
    from tinybn.autograd import Cache

    ops.define(name, lambda a: (a * 2.0, Cache()), lambda dy, cache: (rule(dy),))
    return name


DOUBLE_RIGHT = _define_double("tests.double", lambda dy: dy * 2.0)
DOUBLE_WRONG = [_define_double("tests.double_zero_gradient", lambda dy: dy * 0.0),
                _define_double("tests.double_triple_gradient", lambda dy: dy * 3.0)]


def test_gradcheck_checks_a_non_contiguous_float64_leaf():
    """gradcheck perturbed x.data.reshape(-1), a copy for a strided leaf: every numerical derivative was 0, so a
    backward returning zeros passed, and a right one failed."""
    base = rng.standard_normal((4, 6))
    leaf = lambda: tinybn.Tensor(base.T, requires_grad=True)       # noqa: E731 - an F-ordered view, not copied
    assert not leaf().data.flags.c_contiguous
    from tinybn.autograd import apply

    assert tinybn.gradcheck(lambda t: apply(DOUBLE_RIGHT, t), [leaf()])["ok"]
    for wrong in DOUBLE_WRONG:
        with pytest.raises(AssertionError, match="input 0"):
            tinybn.gradcheck(lambda t: apply(wrong, t), [leaf()])
    strided = tinybn.Tensor(rng.standard_normal((5, 8))[::2, 1::3], requires_grad=True)
    assert tinybn.gradcheck(lambda t: F.sigmoid(t) * t, [strided])["ok"]


def test_gradcheck_accepts_an_empty_leaf():
    report = tinybn.gradcheck(lambda t: t * 2.0, [tinybn.Tensor(numpy.zeros((0, 3)), requires_grad=True)])
    assert report["ok"] and report["where"] is None


# Found by an outside test of the fixes above --------------------------------------------------------------


def test_changing_an_ops_output_in_place_before_backward_is_an_error():
    """exp, sigmoid and pow cache their output y; `y.data += 1` changed what their backward read."""
    for make_output in (lambda x: x.exp(), F.sigmoid, lambda x: x ** 3.0):
        x = tinybn.tensor([0.5, 1.0], requires_grad=True)
        y = make_output(x)
        y.data += 1
        with pytest.raises(RuntimeError, match="changed in place"):
            (y * 3.0).sum().backward()
        assert x.grad is None


def test_a_view_shares_its_inputs_version_counter():
    """A reshape of a tensor that needs no gradient is a view of its array: changing the array in place
    must be seen by the graph that used the view."""
    d = tinybn.tensor(numpy.arange(4.0))
    w = tinybn.tensor(numpy.ones(4), requires_grad=True)
    loss = (d.reshape(2, 2).reshape(4) * w).sum()
    d.data += 10
    with pytest.raises(RuntimeError, match="changed in place"):
        loss.backward()


@pytest.mark.parametrize("layer, shape", [(lambda: nn.BatchNorm2d(3), (0, 3, 4, 4)), (lambda: nn.BatchNorm1d(3), (0, 3)),
                                          (lambda: nn.BatchNorm(3, num_dims=4), (0, 3, 2, 2))])
def test_an_empty_batch_leaves_the_moving_averages_alone(layer, shape):
    """Averaging over no values made the moving statistics NaN for good (PyTorch leaves them unchanged)."""
    bn = layer()
    x = tinybn.tensor(numpy.zeros(shape, numpy.float32), requires_grad=True)
    with numpy.errstate(all="raise"):
        y = bn(x)
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape
    numpy.testing.assert_array_equal(bn.moving_mean.numpy().reshape(-1), 0.0)
    numpy.testing.assert_array_equal(bn.moving_var.numpy().reshape(-1), 1.0)
    assert int(bn.num_batches_tracked.item()) == 0
    numpy.testing.assert_array_equal(bn.gamma.grad.reshape(-1), 0.0)


@pytest.mark.parametrize("model_name", ["lenet", "lenet-bn", "lenet-bn-concise"])
def test_models_predict_an_empty_batch(model_name):
    net = build_model(model_name)
    net(tinybn.tensor(numpy.zeros((2, 1, 28, 28), numpy.float32)))
    net.eval()
    assert net(tinybn.tensor(numpy.zeros((0, 1, 28, 28), numpy.float32))).shape == (0, 10)


@pytest.mark.parametrize("family", tinybn.kernels.available())
def test_conv2d_and_pooling_take_empty_batches_and_channels(family):
    with tinybn.kernels.using(family):
        for x_shape, w_shape in [((0, 1, 5, 5), (2, 1, 3, 3)), ((2, 0, 5, 5), (2, 0, 3, 3))]:
            x, w = tinybn.tensor(numpy.zeros(x_shape), requires_grad=True), tinybn.tensor(numpy.ones(w_shape),
                                                                                          requires_grad=True)
            F.conv2d(x, w).sum().backward()
            assert x.grad.shape == x_shape and w.grad.shape == w_shape
        x = tinybn.tensor(numpy.zeros((0, 1, 4, 4)), requires_grad=True)
        F.max_pool2d(x, 2).sum().backward()
        assert x.grad.shape == (0, 1, 4, 4)


def test_gradcheck_and_assert_same_fail_on_nan():
    """`error > tolerance` is False for NaN, so a NaN gradient or output passed both checkers."""
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.nan_gradient" not in ops.names():
        ops.define("tests.nan_gradient", lambda a: (a * 2.0, Cache()), lambda dy, cache: (dy * numpy.nan,))
    x = tinybn.tensor(numpy.ones(3), requires_grad=True)
    with pytest.raises(AssertionError, match="analytic nan"):
        tinybn.gradcheck(lambda t: apply("tests.nan_gradient", t), [x])
    with pytest.raises(AssertionError):
        tinybn.gradcheck(lambda t: t * numpy.nan, [x])
    with pytest.raises(AssertionError, match="output differs"):
        tinybn.assert_same(lambda t: t * numpy.nan, lambda t: t * 2.0, [x])
    tinybn.assert_same(lambda t: t * numpy.inf, lambda t: t * numpy.inf, [x], check_grad=False)   # equal infinities


def test_a_state_value_that_is_not_an_array_of_numbers_changes_nothing():
    torch = pytest.importorskip("torch")
    source = build_model("lenet-bn-concise")
    source(tinybn.tensor(numpy.zeros((2, 1, 28, 28), numpy.float32)))
    for bad in (lambda v: torch.tensor(v, requires_grad=True), lambda v: numpy.full(v.shape, "x")):
        state = source.state_dict()
        state["15.bias"] = bad(state["15.bias"])
        target = build_model("lenet-bn-concise")
        before = target[0].weight.numpy().copy()
        with pytest.raises(ValueError, match="15.bias"):
            target.load_state_dict(state)
        numpy.testing.assert_array_equal(target[0].weight.numpy(), before)
        assert not nn.is_materialized(target[1].gamma)


def test_a_backward_that_raises_changes_no_gradient():
    c = tinybn.tensor(numpy.ones(3), requires_grad=True)
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    def failing_backward(dy, cache):
        raise ZeroDivisionError("a backward rule failed")

    if "tests.failing_backward" not in ops.names():
        ops.define("tests.failing_backward", lambda a: (a * 1.0, Cache()), failing_backward)
    loss = (c * c).sum() + apply("tests.failing_backward", c).sum()
    with pytest.raises(ZeroDivisionError):
        loss.backward()
    assert c.grad is None


def test_linear_takes_leading_axes_as_pytorch_does():
    torch = pytest.importorskip("torch")
    x, w, b = rng.standard_normal((2, 5, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)
    mine = [tinybn.tensor(a, requires_grad=True) for a in (x, w, b)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    dy = rng.standard_normal((2, 5, 4))
    F.linear(*mine).backward(dy)
    torch.nn.functional.linear(*theirs).backward(torch.tensor(dy))
    for m, t in zip(mine, theirs):
        numpy.testing.assert_allclose(m.grad, t.grad.numpy(), rtol=1e-12)


def test_a_no_grad_generator_passes_throw_and_close_through():
    finally_mode = []

    @tinybn.no_grad()
    def steps():
        try:
            yield 1
        except ValueError:
            yield "caught"
        finally:
            finally_mode.append(tinybn.is_grad_enabled())

    it = steps()
    assert next(it) == 1 and it.throw(ValueError) == "caught"
    it.close()
    assert finally_mode == [False] and tinybn.is_grad_enabled()


def test_a_plain_tensor_cannot_replace_a_parameter():
    """It used to unregister the parameter: no longer trained, no longer saved."""
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="registered as a Parameter"):
        lin.weight = tinybn.tensor(numpy.zeros((2, 3), numpy.float32), requires_grad=True)
    assert [name for name, _ in lin.named_parameters()] == ["weight", "bias"]
    lin.weight = nn.Parameter(numpy.zeros((2, 3), numpy.float32))
    assert [name for name, _ in lin.named_parameters()] == ["weight", "bias"]       # same place in the order


def test_a_zero_dimensional_leaf_gets_a_writable_array():
    x = tinybn.tensor(3.0, requires_grad=True)
    (x * x).backward()
    assert isinstance(x.grad, numpy.ndarray) and x.grad.flags.writeable
    x.grad[()] = 0.0


def test_pow_at_a_zero_base_has_pytorchs_gradients():
    torch = pytest.importorskip("torch")
    for base, exponent in [([0.0, 2.0], [1.0, 2.0]), ([0.0, 0.0, 3.0], [0.0, 2.5, 0.5])]:
        a, b = tinybn.tensor(numpy.array(base), requires_grad=True), tinybn.tensor(numpy.array(exponent),
                                                                                    requires_grad=True)
        (a ** b).sum().backward()
        at, bt = torch.tensor(base, requires_grad=True), torch.tensor(exponent, requires_grad=True)
        (at ** bt).sum().backward()
        numpy.testing.assert_allclose(a.grad, at.grad.numpy())
        numpy.testing.assert_allclose(b.grad, bt.grad.numpy())


def test_module_to_keeps_gradients():
    lin = nn.Linear(2, 2)
    lin(tinybn.tensor(numpy.ones((1, 2), numpy.float32))).sum().backward()
    lin.to("cpu")
    assert lin.weight.grad is not None
    lin.to(dtype=numpy.float64)
    assert lin.weight.grad.dtype == numpy.float64


def test_predictions_made_in_several_threads_equal_a_serial_one():
    """A thread whose map ran serially while another thread's map had the workers used OpenBLAS on its own
    threads, whose other summation order changed float32 results in the last bits."""
    net = build_model("lenet-bn")
    net(tinybn.tensor(rng.random((8, 1, 28, 28)).astype(numpy.float32)))
    net.eval()
    x = tinybn.tensor(rng.random((32, 1, 28, 28)).astype(numpy.float32))
    with tinybn.no_grad():
        serial = net(x).numpy()
    other, stop, outputs = build_model("lenet-bn"), threading.Event(), []
    batch, labels = tinybn.tensor(rng.random((64, 1, 28, 28)).astype(numpy.float32)), tinybn.tensor(numpy.arange(64) % 10)

    def train():
        while not stop.is_set():
            F.cross_entropy(other(batch), labels).backward()

    def predict():
        for _ in range(8):
            with tinybn.no_grad():
                outputs.append(net(x).numpy())

    trainer, predictors = threading.Thread(target=train), [threading.Thread(target=predict) for _ in range(2)]
    trainer.start()
    for thread in predictors:
        thread.start()
    for thread in predictors:
        thread.join()
    stop.set()
    trainer.join()
    assert len(outputs) == 16
    for output in outputs:
        numpy.testing.assert_array_equal(output, serial)


@pytest.mark.parametrize("family", tinybn.kernels.available())
def test_a_float64_loss_reaches_float32_kernels_as_float32(family):
    """The upstream gradient of a float64 loss (a float32 net against float64 targets) crashed the fast linear
    and conv2d backward (np.dot's out= takes only its own dtype); PyTorch casts a gradient to its tensor's dtype."""
    for net, shape in [(nn.Sequential(nn.Linear(5, 8), nn.Sigmoid(), nn.Linear(8, 1)), (4, 5)),
                       (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 1)), (4, 1, 5, 5))]:
        x = tinybn.tensor(rng.random(shape).astype(numpy.float32))
        with tinybn.kernels.using(family):
            ((net(x) - rng.random((4, 1))) ** 2).mean().backward()
        assert all(p.grad.dtype == numpy.float32 for p in net.parameters())


def test_a_backward_must_return_one_gradient_per_input():
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.forgets_a_gradient" not in ops.names():
        ops.define("tests.forgets_a_gradient", lambda a, b: (a * b, Cache(a=a, b=b)), lambda dy, cache: (dy * cache.b,))
    a, b = tinybn.tensor(numpy.ones(3), requires_grad=True), tinybn.tensor(numpy.full(3, 5.0), requires_grad=True)
    with pytest.raises(RuntimeError, match="returned 1 gradient.*for 2 input"):
        apply("tests.forgets_a_gradient", a, b).sum().backward()
    assert a.grad is None and b.grad is None


def test_gradcheck_of_one_array_given_twice_checks_each_input_alone():
    x = tinybn.tensor(numpy.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    y = tinybn.Tensor(x.data[1:], requires_grad=True)       # a view overlapping x
    assert tinybn.gradcheck(lambda a, b: a * b, [x, x])["ok"]
    assert tinybn.gradcheck(lambda a, b: a[1:] * b, [x, y])["ok"]
    assert tinybn.gradcheck(lambda a, b: a[1:] * b, [x, y], raise_on_failure=False)["worst_abs"] < 1e-6


def test_assert_same_compares_dtypes_and_requires_grad():
    x = tinybn.tensor(numpy.ones((2, 3), dtype=numpy.float32), requires_grad=True)
    with pytest.raises(AssertionError, match="dtype float64"):
        tinybn.assert_same(lambda a: a * 2, lambda a: (a * 2).astype(numpy.float64), [x])
    with pytest.raises(AssertionError, match="requires_grad False"):
        tinybn.assert_same(lambda a: a * 2, lambda a: (a * 2).detach(), [x])


# third outside test ----------------------------------------------------------------------------------------


def test_assert_same_tells_an_infinity_from_a_finite_value_and_from_its_opposite():
    """inf <= atol + rtol·inf held, so a finite value passed for +inf, and −inf for +inf."""
    x = tinybn.tensor(numpy.array([1.0, 2.0, 3.0]), requires_grad=True)
    plus, minus = numpy.array([numpy.inf, 1, 1]), numpy.array([-numpy.inf, 1, 1])
    for fast, reference in [(numpy.ones(3), plus), (minus, plus)]:
        with pytest.raises(AssertionError, match=r"output differs from the reference at \(0,\)"):
            tinybn.assert_same(lambda a, f=fast: a * tinybn.tensor(f), lambda a, r=reference: a * tinybn.tensor(r), [x],
                               check_grad=False)
    tinybn.assert_same(lambda a: a * tinybn.tensor(plus), lambda a: a * tinybn.tensor(plus), [x], check_grad=False)


def test_gradcheck_fails_where_the_difference_quotient_is_infinite_or_nan():
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.jumps_to_inf" not in ops.names():
        ops.define("tests.jumps_to_inf", lambda a: (numpy.where(a > 1.0, numpy.inf, a), Cache()), lambda dy, cache: (dy,))
    x = tinybn.tensor(numpy.array([0.0, 1.0]), requires_grad=True)
    with pytest.raises(AssertionError, match=r"index \(1,\).*numeric -?inf"):
        tinybn.gradcheck(lambda a: apply("tests.jumps_to_inf", a), [x])
    report = tinybn.gradcheck(lambda a: a * numpy.nan, [x], raise_on_failure=False)
    assert not report["ok"] and report["where"] == "a (input 0), index (0,)"


def test_backward_takes_numbers_and_lists_as_the_upstream_gradient():
    x = tinybn.tensor(numpy.array([1.0, 2.0, 3.0]), requires_grad=True)
    (x * 2).backward([1.0, 0.5, 0.0])
    numpy.testing.assert_array_equal(x.grad, [2.0, 1.0, 0.0])
    x.grad = None
    (x * 2).sum().backward(3.0)
    numpy.testing.assert_array_equal(x.grad, [6.0, 6.0, 6.0])
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward([1.0, 2.0])
    with pytest.raises(TypeError, match="a gradient must be"):
        (x * 2).backward([object(), 1, 2])


def test_a_backward_rule_that_returns_a_bare_array_is_told_to_return_a_tuple():
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.bare" not in ops.names():
        ops.define("tests.bare", lambda a: (-a, Cache()), lambda dy, cache: -dy)
    for shape in [(3,), (1, 3), (2, 3), ()]:
        x = tinybn.tensor(numpy.ones(shape), requires_grad=True)
        with pytest.raises(RuntimeError, match="returned a (ndarray|float64); it must return a tuple"):
            apply("tests.bare", x).sum().backward()


def test_no_grad_and_enable_grad_decorate_with_or_without_parentheses():
    @tinybn.no_grad
    def off():
        return tinybn.is_grad_enabled()

    @tinybn.enable_grad
    def on():
        return tinybn.is_grad_enabled()

    assert off() is False and tinybn.is_grad_enabled()
    with tinybn.no_grad():
        assert on() is True and not tinybn.is_grad_enabled()


def test_a_lazy_batch_norm_loads_a_state_given_as_lists():
    bn = nn.BatchNorm1d()
    bn.load_state_dict({"gamma": [1.0, 2.0], "beta": [0.0, 0.5], "moving_mean": [0.0, 0.0], "moving_var": [1.0, 1.0],
                        "num_batches_tracked": 3})
    numpy.testing.assert_array_equal(bn.gamma.numpy(), [1.0, 2.0])
    assert bn.num_features == 2


def test_functional_batch_norm_checks_its_momentum():
    x = tinybn.tensor(numpy.random.default_rng(0).random((4, 3)))
    for momentum in (5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum must be in"):
            F.batch_norm(x, numpy.ones(3), numpy.zeros(3), numpy.zeros(3), numpy.ones(3), training=True,
                         momentum=momentum)


@pytest.mark.parametrize("build, words", [
    (lambda: nn.Linear(0, 3), "Linear: in_features"), (lambda: nn.Linear(3, 0), "Linear: out_features"),
    (lambda: nn.Linear(2.5, 3), "in_features"), (lambda: nn.Conv2d(1, 1, 2, stride=0), "Conv2d: stride"),
    (lambda: nn.Conv2d(1, 1, 2, padding=-1), "Conv2d: padding"), (lambda: nn.Conv2d(1, 1, (2, 0)), "kernel_size"),
    (lambda: nn.Conv2d(0, 1, 2), "in_channels"), (lambda: nn.MaxPool2d(2, stride=0), "MaxPool2d: stride"),
    (lambda: nn.AvgPool2d(0), "AvgPool2d: kernel_size"), (lambda: nn.MaxPool2d(2, padding=-1), "padding"),
    (lambda: nn.BatchNorm2d(0), "BatchNorm2d: num_features"), (lambda: nn.BatchNorm(-1, 2), "num_features"),
])
def test_layers_check_their_sizes_when_built(build, words):
    with pytest.raises(ValueError, match=words):
        build()
