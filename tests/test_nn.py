"""Modules: registration, state dicts, modes, devices, input errors, and a LeNet-BN gradient check."""
import threading

import numpy
import pytest

import tinybn
from tinybn import functional as F, nn
from tinybn.app.models import build_model
from tinybn.optim import SGD

from conftest import make

rng = numpy.random.default_rng(9)


def small_lenet_bn(concise=False):
    bn4 = (lambda c: nn.BatchNorm2d()) if concise else (lambda c: nn.BatchNorm(c, num_dims=4))
    bn2 = (lambda c: nn.BatchNorm1d()) if concise else (lambda c: nn.BatchNorm(c, num_dims=2))
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3), bn4(2), nn.Sigmoid(), nn.MaxPool2d(2, 2),
        nn.Conv2d(2, 3, kernel_size=2), bn4(3), nn.Sigmoid(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(3, 4), bn2(4), nn.Sigmoid(), nn.Linear(4, 3))


def test_lenet_bn_layer_level_gradient_check(device):
    """Every parameter of a small LeNet-BN, through the loss, in float64 against finite differences."""
    net = small_lenet_bn().to(device, dtype=numpy.float64)
    x = make(numpy.random.default_rng(0).standard_normal((4, 1, 10, 10)), device)
    labels = make(numpy.array([0, 1, 2, 1]), device)
    slots = [(module, name) for _, module in net.named_modules() for name, p in module._parameters.items()
             if p is not None]

    def loss_of(*values):
        # gradcheck hands over float64 copies of the parameters; let the layers read those copies
        for (module, name), value in zip(slots, values):
            object.__setattr__(module, name, value)
        return tinybn.functional.cross_entropy(net(x), labels)

    params = [getattr(module, name) for module, name in slots]
    assert len(params) == 14
    report = tinybn.gradcheck(loss_of, params, rtol=1e-3)
    assert report["ok"]


def test_parameters_buffers_and_indexing():
    net = small_lenet_bn()
    names = [name for name, _ in net.named_parameters()]
    assert names[:4] == ["0.weight", "0.bias", "1.gamma", "1.beta"]
    assert len(net.parameters()) == 14
    assert [name for name, _ in net.named_buffers()][:2] == ["1.moving_mean", "1.moving_var"]
    assert net[1].gamma.shape == (1, 2, 1, 1)
    assert isinstance(net[0], nn.Conv2d) and len(net) == 13


def test_train_eval_propagates():
    net = small_lenet_bn()
    net.eval()
    assert all(not m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_state_dict_round_trip(device):
    net = small_lenet_bn().to(device)
    x = make(numpy.random.default_rng(1).standard_normal((4, 1, 10, 10)), device).astype(numpy.float32)
    net(x)  # moves the moving averages
    state = net.state_dict()
    assert all(isinstance(v, numpy.ndarray) for v in state.values())
    other = small_lenet_bn().to(device)
    other.load_state_dict(state)
    net.eval(), other.eval()
    numpy.testing.assert_array_equal(net(x).numpy(), other(x).numpy())


def test_lazy_layers_load_their_size_from_a_state_dict():
    source = small_lenet_bn(concise=True)
    source(tinybn.tensor(numpy.zeros((2, 1, 10, 10), numpy.float32) + numpy.arange(10, dtype=numpy.float32)))
    target = small_lenet_bn(concise=True)
    target.load_state_dict(source.state_dict())
    assert target[1].num_features == 2 and target[10].gamma.shape == (4,)


def test_load_state_dict_names_what_is_wrong():
    net = small_lenet_bn()
    state = net.state_dict()
    state.pop("0.bias")
    state["extra.weight"] = numpy.zeros(1)
    with pytest.raises(KeyError, match=r"missing entries \['0.bias'\].*unexpected entries \['extra.weight'\]"):
        net.load_state_dict(state)
    state = net.state_dict()
    state["9.weight"] = numpy.zeros((5, 3))
    before = net[0].weight.numpy().copy()
    with pytest.raises(ValueError, match=r"9.weight: expected \(4, 3\), got \(5, 3\)"):
        net.load_state_dict(state)
    numpy.testing.assert_array_equal(net[0].weight.numpy(), before)  # nothing was loaded


@pytest.mark.parametrize("layer, shape, match", [
    (nn.Conv2d(1, 6, 5), (2, 28, 28), r"Conv2d\(1, 6.*expects a 4-D input of shape \(N, 1, H, W\), got shape \(2, 28, 28\)"),
    (nn.Conv2d(1, 6, 5), (2, 3, 28, 28), r"expects 1 channels.*got shape \(2, 3, 28, 28\)"),
    (nn.Linear(256, 120), (2, 100), r"Linear\(256, 120.*expects 256 channels/features.*got shape \(2, 100\)"),
    (nn.Linear(256, 120), (2, 16, 4, 4), r"expects a 2-D input of shape \(N, 256\)"),
    (nn.BatchNorm(6, num_dims=4), (2, 6), r"BatchNorm\(6, num_dims=4.*4-D input"),
    (nn.BatchNorm(6, num_dims=4), (2, 5, 3, 3), r"expects 6 channels"),
    (nn.BatchNorm1d(), (2, 3, 4, 4), r"BatchNorm1d.*2-D input"),
    (nn.BatchNorm2d(8), (2, 4, 3, 3), r"BatchNorm2d\(8.*expects 8 channels"),
    (nn.MaxPool2d(2), (4, 4), r"MaxPool2d.*4-D input"),
])
def test_layers_name_the_expected_and_received_shape(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer(tinybn.tensor(numpy.zeros(shape, numpy.float32)))


@pytest.mark.parametrize("layer, shape", [(nn.Conv2d(1, 2, 3), (1, 1, 5, 5)), (nn.Linear(3, 2), (2, 3)),
                                          (nn.BatchNorm2d(2), (2, 2, 3, 3))])
def test_layers_refuse_integer_input(layer, shape):
    with pytest.raises(ValueError, match="floating-point input, got dtype int64"):
        layer(tinybn.tensor(numpy.zeros(shape, numpy.int64)))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="Dropout probability"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(3, momentum=2.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        tinybn.functional.cross_entropy(tinybn.tensor(numpy.zeros((2, 3))), tinybn.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer class labels"):
        tinybn.functional.cross_entropy(tinybn.tensor(numpy.zeros((2, 3))), tinybn.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="does not fit"):
        tinybn.functional.conv2d(tinybn.tensor(numpy.zeros((1, 1, 3, 3))), tinybn.tensor(numpy.zeros((1, 1, 5, 5))))
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        tinybn.functional.max_pool2d(tinybn.tensor(numpy.zeros((1, 1, 4, 4))), 2, stride=(1, 2, 3))


def test_stable_sigmoid_and_cross_entropy():
    x = tinybn.tensor(numpy.array([-1e4, -50.0, 0.0, 50.0, 1e4]), requires_grad=True)
    with numpy.errstate(over="raise", invalid="raise", divide="raise"):
        y = tinybn.functional.sigmoid(x)
        y.sum().backward()
    numpy.testing.assert_allclose(y.numpy(), [0.0, 1.9287498479639178e-22, 0.5, 1.0, 1.0])
    logits = tinybn.tensor(numpy.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]]), requires_grad=True)
    with numpy.errstate(over="raise", invalid="raise", divide="raise"):
        loss = tinybn.functional.cross_entropy(logits, tinybn.tensor([0, 1]))
        loss.backward()
    assert loss.item() == pytest.approx(numpy.log(2) / 2)
    assert numpy.isfinite(logits.grad).all()


def test_dropout_keeps_expectation_and_is_identity_in_eval():
    x = tinybn.tensor(numpy.ones((200, 200), numpy.float32))
    layer = nn.Dropout(0.3)
    y = layer(x).numpy()
    assert abs((y == 0).mean() - 0.3) < 0.01 and abs(y.mean() - 1.0) < 0.02
    layer.eval()
    numpy.testing.assert_array_equal(layer(x).numpy(), x.numpy())


def test_a_float32_layer_refuses_float64_input_as_pytorch_does():
    """Issue 21: a float32 Linear took float64 input and returned float64; PyTorch refuses the mismatch."""
    for layer, x in ((nn.Linear(3, 2), numpy.ones((2, 3))), (nn.Conv2d(1, 2, 3), numpy.ones((1, 1, 4, 4)))):
        with pytest.raises(ValueError, match=r"has float32 weights but got a float64 input; cast the input"):
            layer(tinybn.tensor(x))
        assert layer(tinybn.tensor(x, dtype="float32")).dtype == numpy.float32
        assert layer.to(dtype="float64")(tinybn.tensor(x)).dtype == numpy.float64


# ---- found as defects (once in test_regressions.py), each named after what it holds


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

def test_lazy_parameters_say_why_they_have_no_array_yet():
    layer = nn.BatchNorm2d()
    with pytest.raises(RuntimeError, match="infers it from the first input"):
        layer.gamma.shape
    with pytest.raises(RuntimeError, match="run one batch through the model first"):
        layer.state_dict()
    layer(tinybn.tensor(rng.standard_normal((2, 3, 4, 4)).astype(numpy.float32)))
    assert type(layer.gamma) is nn.Parameter and layer.gamma.shape == (3,)

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

@pytest.mark.parametrize("model_name", ["lenet", "lenet-bn", "lenet-bn-concise"])
def test_models_predict_an_empty_batch(model_name):
    net = build_model(model_name)
    net(tinybn.tensor(numpy.zeros((2, 1, 28, 28), numpy.float32)))
    net.eval()
    assert net(tinybn.tensor(numpy.zeros((0, 1, 28, 28), numpy.float32))).shape == (0, 10)

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

def test_a_plain_tensor_cannot_replace_a_parameter():
    """It used to unregister the parameter: no longer trained, no longer saved."""
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="registered as a Parameter"):
        lin.weight = tinybn.tensor(numpy.zeros((2, 3), numpy.float32), requires_grad=True)
    assert [name for name, _ in lin.named_parameters()] == ["weight", "bias"]
    lin.weight = nn.Parameter(numpy.zeros((2, 3), numpy.float32))
    assert [name for name, _ in lin.named_parameters()] == ["weight", "bias"]       # same place in the order

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
