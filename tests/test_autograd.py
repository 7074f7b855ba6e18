"""The autograd engine: accumulation, fan-out, no_grad, broadcasting, deep graphs, freeing."""
import threading

import numpy
import pytest

import tinybn
from tinybn import functional as F, nn
from tinybn.optim import SGD

from conftest import make

rng = numpy.random.default_rng(9)


def test_fan_out_adds_every_path(device):
    x = make(numpy.array([1.5, -2.0]), device, requires_grad=True)
    y = x * x + x * 3.0 + x  # dy/dx = 2x + 4
    y.sum().backward()
    numpy.testing.assert_allclose(tinybn.tensor(x.grad).numpy(), 2 * numpy.array([1.5, -2.0]) + 4)


def test_shared_subexpression():
    x = tinybn.tensor([2.0], requires_grad=True)
    h = x * x
    z = h * h + h  # x^4 + x^2 -> 4x^3 + 2x = 36
    z.backward()
    assert float(x.grad[0]) == pytest.approx(36.0)


def test_gradients_accumulate_across_backward_calls():
    x = tinybn.tensor([1.0, 2.0], requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    numpy.testing.assert_allclose(x.grad, [5.0, 5.0])
    x.zero_grad()
    assert x.grad is None


def test_no_grad_records_nothing():
    x = tinybn.tensor([1.0], requires_grad=True)
    with tinybn.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    assert tinybn.is_grad_enabled()


def test_no_grad_as_decorator():
    @tinybn.no_grad()
    def f(x):
        return x * 2.0
    assert not f(tinybn.tensor([1.0], requires_grad=True)).requires_grad


def test_broadcast_gradients_are_reduced(device):
    a = make(numpy.ones((3, 1)), device, requires_grad=True)
    b = make(numpy.ones(4), device, requires_grad=True)
    (a * b).sum().backward()
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,)
    numpy.testing.assert_allclose(tinybn.tensor(a.grad).numpy(), numpy.full((3, 1), 4.0))
    numpy.testing.assert_allclose(tinybn.tensor(b.grad).numpy(), numpy.full(4, 3.0))


def test_thousand_layer_chain_has_no_recursion_limit():
    x = tinybn.tensor([0.5], requires_grad=True)
    y = x
    for _ in range(1000):
        y = y * 1.001 + 0.0
    y.backward()
    assert float(x.grad[0]) == pytest.approx(1.001 ** 1000, rel=1e-4)
    y2 = x
    for _ in range(5000):
        y2 = tinybn.functional.sigmoid(y2)
    y2.backward()  # deeper than Python's recursion limit


def test_graph_is_freed_after_backward():
    x = tinybn.tensor([1.0], requires_grad=True)
    y = x * 2.0
    z = y * 3.0
    z.backward()
    for t in (y, z):  # the nodes let go of their rules and caches, and the tensors stay non-leaves
        assert t._node.backward is None and t._node.cache is None and not t.is_leaf


def test_graph_does_not_keep_intermediate_tensors():
    """Only what a backward rule caches stays alive: sigmoid keeps its output, not its input."""
    import weakref

    x = tinybn.tensor(numpy.linspace(-2, 2, 5), requires_grad=True)
    middle = x * 2.0
    middle_ref = weakref.ref(middle)
    out = tinybn.functional.sigmoid(middle)
    del middle
    assert middle_ref() is None
    out.backward(numpy.ones(5))
    s = 1 / (1 + numpy.exp(-2 * numpy.linspace(-2, 2, 5)))
    numpy.testing.assert_allclose(x.grad, 2 * s * (1 - s), rtol=1e-6)


def test_second_backward_through_a_freed_graph_is_an_error():
    x = tinybn.tensor([1.0], requires_grad=True)
    shared = x * 2.0
    first, second = shared * 3.0, shared * 4.0
    first.backward()
    with pytest.raises(RuntimeError, match="graph was freed.*run the forward computation again"):
        second.backward()
    assert float(x.grad[0]) == 6.0, "the failed call changed nothing"


def test_explicit_upstream_gradient_and_its_shape_check():
    x = tinybn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="one-element"):
        y.backward()
    with pytest.raises(ValueError, match="shape"):
        (x * 2.0).backward(numpy.ones(2))
    (x * 2.0).backward(numpy.array([1.0, 0.0, -1.0]))
    numpy.testing.assert_allclose(x.grad, [2.0, 0.0, -2.0])


def test_tensor_api():
    t = tinybn.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert t.dtype == numpy.float32 and t.shape == (2, 2) and t.device == "cpu"
    assert tinybn.tensor([1, 2]).dtype == numpy.int64
    assert t.sum().item() == 10.0
    assert t.to("cpu") is t
    numpy.testing.assert_array_equal(t.numpy(), [[1, 2], [3, 4]])
    source = numpy.zeros(3)
    copy = tinybn.tensor(source)
    copy.data[0] = 1
    assert source[0] == 0, "tensor() copies its input"
    d = tinybn.tensor([1.0], requires_grad=True) * 2.0
    assert not d.detach().requires_grad
    with pytest.raises(TypeError, match="floating-point"):
        tinybn.tensor([1, 2], requires_grad=True)
    with pytest.raises(ValueError, match="one element"):
        t.item()


def test_a_numpy_scalar_takes_the_tensors_dtype_as_in_pytorch():
    """Issue 21: float32 times np.float64(2.0) became float64 (NumPy's rule); PyTorch keeps float32 for a scalar."""
    x = tinybn.tensor(numpy.ones(3, numpy.float32), requires_grad=True)
    for y in (x * numpy.float64(2.0), numpy.float64(2.0) * x, x + numpy.float64(1.0), x / numpy.float64(2.0),
              x ** numpy.float64(2.0), x * numpy.int64(3)):
        assert y.dtype == numpy.float32
    (x * numpy.float64(2.0)).sum().backward()
    assert x.grad.dtype == numpy.float32 and (x.grad == 2.0).all()
    assert (x * numpy.ones(3)).dtype == numpy.float64       # an array keeps NumPy's promotion, as in PyTorch


def test_one_op_refuses_tensors_on_two_devices_and_moves_numpy_constants_to_its_device():
    """Found on the first GPU run: a GPU tensor times a NumPy array, or backward(numpy gradient) on a GPU tensor,
    failed deep in CuPy ("Unsupported type numpy.ndarray"), and a CPU input to a GPU layer did too. As in PyTorch, an
    op's tensors must share one device, and the error says which devices met; a NumPy constant or gradient is moved
    to the tensors' device. The strict stand-in plays the GPU here (it refuses any host array inside an op)."""
    x = tinybn.tensor([1.0, 2.0, 3.0], device="strict", requires_grad=True)
    y = x * numpy.array([2.0, 3.0, 4.0], dtype=numpy.float32)
    assert y.device == "strict"
    y.backward(numpy.array([1.0, 0.0, -1.0], dtype=numpy.float32))
    numpy.testing.assert_allclose(tinybn.backend.to_numpy(x.grad), [2.0, 0.0, -4.0])
    with pytest.raises(RuntimeError, match="expected all tensors on one device, got cpu and strict.*to\\(device\\)"):
        x * tinybn.tensor([1.0, 1.0, 1.0])


# ---- found as defects (once in test_regressions.py), each named after what it holds


@pytest.mark.parametrize("axes", [(-1, 0, 1), (2, -3, -2), (-1, -2, -3)])
def test_transpose_with_negative_axes_has_the_right_gradient(axes):
    x = tinybn.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    y = x.transpose(*axes)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    positive = tuple(a % 3 for a in axes)
    numpy.testing.assert_array_equal(y.numpy(), x.numpy().transpose(positive))
    numpy.testing.assert_array_equal(x.grad, dy.transpose(numpy.argsort(positive)))

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

def test_a_backward_must_return_one_gradient_per_input():
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.forgets_a_gradient" not in ops.names():
        ops.define("tests.forgets_a_gradient", lambda a, b: (a * b, Cache(a=a, b=b)), lambda dy, cache: (dy * cache.b,))
    a, b = tinybn.tensor(numpy.ones(3), requires_grad=True), tinybn.tensor(numpy.full(3, 5.0), requires_grad=True)
    with pytest.raises(RuntimeError, match="returned 1 gradient.*for 2 input"):
        apply("tests.forgets_a_gradient", a, b).sum().backward()
    assert a.grad is None and b.grad is None

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
