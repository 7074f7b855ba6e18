"""Batch norm beyond the gradient table: staged = closed form, moving averages, modes, stability, errors."""
import numpy
import pytest

import tinybn
from tinybn.app.models import build_model
from tinybn.optim import SGD
from tinybn import functional as F, nn
from tinybn.functional import batchnorm as bn_math

from conftest import make

rng = numpy.random.default_rng(5)


@pytest.mark.study
@pytest.mark.parametrize("shape", [(8, 5), (3, 4, 5, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_staged_backward_equals_closed_form(shape, training, device):
    xp = tinybn.get_array_module(make(numpy.zeros(1), device).data)
    x = make(rng.standard_normal(shape) * 3 + 2, device).data
    c = shape[1]
    gamma, beta = make(rng.uniform(0.5, 2, c), device).data, make(rng.standard_normal(c), device).data
    mean, var = make(rng.standard_normal(c), device).data, make(rng.uniform(0.5, 2, c), device).data
    (y, _, _), cache = bn_math.batch_norm_forward(x, gamma, beta, mean, var, training)
    dy = make(rng.standard_normal(shape), device).data
    closed = bn_math.batch_norm_backward(dy, cache)
    staged = bn_math.batch_norm_backward_staged(dy, cache)
    for name, a, b in zip(["dx", "dgamma", "dbeta"], closed, staged):
        assert a.shape == b.shape, name
        assert float(xp.abs(a - b).max()) < 1e-10, name


def test_moving_average_update_closed_form(device):
    x = rng.standard_normal((16, 3)) * 2 + 5
    old_mean, old_var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    _, new_mean, new_var = F.batch_norm(make(x, device), make(numpy.ones(3), device), make(numpy.zeros(3), device),
                                        make(old_mean, device), make(old_var, device), training=True, momentum=0.8)
    batch_mean, batch_var = x.mean(axis=0), x.var(axis=0)  # biased variance
    numpy.testing.assert_allclose(new_mean.numpy(), 0.8 * old_mean + 0.2 * batch_mean, rtol=1e-12)
    numpy.testing.assert_allclose(new_var.numpy(), 0.8 * old_var + 0.2 * batch_var, rtol=1e-12)


def test_prediction_mode_uses_and_keeps_moving_averages(device):
    x = rng.standard_normal((4, 2, 3, 3))
    mean, var = rng.standard_normal((1, 2, 1, 1)), rng.uniform(0.5, 2, (1, 2, 1, 1))
    y, new_mean, new_var = F.batch_norm(make(x, device), make(numpy.full((1, 2, 1, 1), 2.0), device),
                                        make(numpy.full((1, 2, 1, 1), 0.5), device), make(mean, device),
                                        make(var, device), training=False, eps=1e-5)
    numpy.testing.assert_allclose(y.numpy(), 2.0 * (x - mean) / numpy.sqrt(var + 1e-5) + 0.5, rtol=1e-12)
    numpy.testing.assert_array_equal(new_mean.numpy(), mean)
    numpy.testing.assert_array_equal(new_var.numpy(), var)


def test_training_output_is_standardized_per_channel(device):
    x = rng.standard_normal((8, 3, 4, 4)) * numpy.array([1, 10, 0.1]).reshape(1, 3, 1, 1) + 7
    y, _, _ = F.batch_norm(make(x, device), make(numpy.ones(3), device), make(numpy.zeros(3), device),
                           make(numpy.zeros(3), device), make(numpy.ones(3), device), training=True, eps=1e-12)
    y = y.numpy()
    numpy.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    numpy.testing.assert_allclose(y.std(axis=(0, 2, 3)), 1, rtol=1e-10)


def test_eps_must_be_positive_in_training(device):
    """As in PyTorch: with eps = 0 a constant channel (σ² = 0) would give NaN outputs."""
    ones = make(numpy.ones(2), device)
    x = make(numpy.ones((4, 2)), device)
    with pytest.raises(ValueError, match="eps must be positive in training mode"):
        F.batch_norm(x, ones, ones, ones, ones, training=True, eps=0.0)
    y, _, _ = F.batch_norm(x, ones, ones, ones, ones, training=False, eps=0.0)    # σ² from the moving average
    assert numpy.isfinite(y.numpy()).all()
    with pytest.raises(ValueError, match="eps must be positive"):
        nn.BatchNorm2d(3, eps=0.0)


def test_variance_is_stable_for_large_means(device):
    """float32, mean 1e4, std 1: E[x²] − E[x]² would lose everything; the two-pass variance does not."""
    x = (rng.standard_normal((512, 4)) + 1e4).astype(numpy.float32)
    one, zero = make(numpy.ones(4, numpy.float32), device), make(numpy.zeros(4, numpy.float32), device)
    y, _, new_var = F.batch_norm(make(x, device), one, zero, zero, one, training=True, momentum=0.0)
    assert y.dtype == numpy.float32
    numpy.testing.assert_allclose(y.numpy().std(axis=0), 1.0, rtol=1e-2)
    numpy.testing.assert_allclose(new_var.numpy(), x.astype(numpy.float64).var(axis=0), rtol=1e-2)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_is_refused_in_training(shape, device):
    ones = make(numpy.ones(3), device)
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batch_norm(make(numpy.ones(shape), device), ones, ones * 0, ones * 0, ones, training=True)
    F.batch_norm(make(numpy.ones(shape), device), ones, ones * 0, ones * 0, ones, training=False)  # fine in eval


def test_batch_norm_rejects_other_ranks():
    ones = make(numpy.ones(3), "cpu")
    with pytest.raises(ValueError, match="2-D .* or 4-D"):
        F.batch_norm(make(numpy.ones((2, 3, 4)), "cpu"), ones, ones, ones, ones, training=True)


def test_function_does_not_mutate_its_arguments(device):
    mean, var = make(numpy.zeros(3), device), make(numpy.ones(3), device)
    F.batch_norm(make(rng.standard_normal((4, 3)) + 3, device), make(numpy.ones(3), device),
                 make(numpy.zeros(3), device), mean, var, training=True)
    numpy.testing.assert_array_equal(mean.numpy(), 0)
    numpy.testing.assert_array_equal(var.numpy(), 1)


@pytest.mark.parametrize("layer_factory, shape", [
    (lambda: nn.BatchNorm(3, num_dims=4), (6, 3, 4, 4)),
    (lambda: nn.BatchNorm(3, num_dims=2), (6, 3)),
    (lambda: nn.BatchNorm2d(), (6, 3, 4, 4)),
    (lambda: nn.BatchNorm1d(), (6, 3)),
])
def test_layer_train_and_eval_differ(layer_factory, shape, device):
    layer = layer_factory().to(device)
    x = make(rng.standard_normal(shape) * 2 + 3, device, requires_grad=False).astype(numpy.float32)
    y_train = layer(x).numpy()
    assert layer.num_features == 3
    assert not numpy.allclose(layer.moving_mean.numpy(), 0), "training must move the moving mean"
    layer.eval()
    y_eval = layer(x).numpy()
    frozen = layer.moving_mean.numpy().copy()
    layer(x)
    numpy.testing.assert_array_equal(layer.moving_mean.numpy(), frozen)  # eval changes nothing
    assert not numpy.allclose(y_train, y_eval, atol=1e-2)


def test_from_scratch_layer_shapes_match_the_chapter():
    assert nn.BatchNorm(6, num_dims=4).gamma.shape == (1, 6, 1, 1)
    assert nn.BatchNorm(120, num_dims=2).moving_var.shape == (1, 120)
    assert nn.BatchNorm2d(6).gamma.shape == (6,)
    with pytest.raises(ValueError, match="num_dims"):
        nn.BatchNorm(6, num_dims=3)


def test_momentum_none_gives_exact_population_statistics():
    """Cumulative averaging: after k batches the moving mean is the mean of the k batch means."""
    layer = nn.BatchNorm1d(2, momentum=None)
    batches = [rng.standard_normal((10, 2)) * (i + 1) + i for i in range(5)]
    for batch in batches:
        layer(tinybn.tensor(batch.astype(numpy.float32)))
    numpy.testing.assert_allclose(layer.moving_mean.numpy(), numpy.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    numpy.testing.assert_allclose(layer.moving_var.numpy(), numpy.mean([b.var(0) for b in batches], 0), rtol=1e-5)


def test_momentum_conversion():
    assert bn_math.torch_momentum_to_tinybn(0.1) == pytest.approx(0.9)


def test_matches_pytorch_batchnorm2d():
    """Same output and gradients as torch.nn.BatchNorm2d; running mean equal under momentum 1 − 0.1."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((4, 3, 5, 5))
    dy = rng.standard_normal(x.shape)
    layer = nn.BatchNorm2d(3, dtype=numpy.float64)
    xt = tinybn.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(dy)
    ref = torch.nn.BatchNorm2d(3, momentum=0.1).double()
    xr = torch.tensor(x, requires_grad=True)
    yr = ref(xr)
    yr.backward(torch.tensor(dy))
    numpy.testing.assert_allclose(y.numpy(), yr.detach().numpy(), atol=1e-10)
    numpy.testing.assert_allclose(xt.grad, xr.grad.numpy(), atol=1e-10)
    numpy.testing.assert_allclose(layer.gamma.grad, ref.weight.grad.numpy(), atol=1e-10)
    numpy.testing.assert_allclose(layer.moving_mean.numpy(), ref.running_mean.numpy(), atol=1e-12)
    m = x.size // 3  # PyTorch's running_var takes the unbiased variance; tinybn the biased one
    unbiased = 0.9 + 0.1 * x.var(axis=(0, 2, 3)) * m / (m - 1)
    numpy.testing.assert_allclose(ref.running_var.numpy(), unbiased, rtol=1e-10)


# ---- found as defects (once in test_regressions.py), each named after what it holds


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

def test_functional_batch_norm_checks_its_momentum():
    x = tinybn.tensor(numpy.random.default_rng(0).random((4, 3)))
    for momentum in (5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="momentum must be in"):
            F.batch_norm(x, numpy.ones(3), numpy.zeros(3), numpy.zeros(3), numpy.ones(3), training=True,
                         momentum=momentum)

def test_a_lazy_batch_norm_loads_a_state_given_as_lists():
    bn = nn.BatchNorm1d()
    bn.load_state_dict({"gamma": [1.0, 2.0], "beta": [0.0, 0.5], "moving_mean": [0.0, 0.0], "moving_var": [1.0, 1.0],
                        "num_batches_tracked": 3})
    numpy.testing.assert_array_equal(bn.gamma.numpy(), [1.0, 2.0])
    assert bn.num_features == 2

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

def test_frozen_concise_gamma_stays_frozen_after_it_takes_its_size():
    layer = nn.BatchNorm1d()
    layer.gamma.requires_grad = False
    layer(tinybn.tensor(rng.standard_normal((4, 3)).astype(numpy.float32)))
    assert layer.gamma.requires_grad is False and layer.beta.requires_grad is True
