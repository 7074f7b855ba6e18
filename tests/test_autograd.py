"""The autograd engine: accumulation, fan-out, no_grad, broadcasting, deep graphs, freeing."""
import numpy
import pytest

import tinybn

from conftest import make


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
