"""The chapter's batch norm, as its PyTorch code computes it, against tinybn's, in float64: the output, the new
moving averages and every gradient (with a random upstream gradient: for batch norm the sum of the outputs does
not depend on x, so an upstream gradient of ones would check nothing), on fully connected and convolutional
inputs, in training and in prediction mode. Part of the study tier (``pytest -m study``)."""
import numpy
import pytest

import tinybn
from tinybn import functional as F, nn

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.study


def chapter_batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training):
    """The chapter's from-scratch function, in PyTorch: batch statistics over the batch (and the spatial axes for
    a convolution), x̂ = (X − μ) / √(σ² + ε), Y = γ x̂ + β, and moving averages that keep ``momentum`` of the old
    value. In prediction mode the moving averages normalize and nothing is updated."""
    if not training:
        return gamma * (X - moving_mean) / torch.sqrt(moving_var + eps) + beta, moving_mean, moving_var
    axes = (0,) if X.dim() == 2 else (0, 2, 3)
    mean = X.mean(dim=axes, keepdim=True)
    var = ((X - mean) ** 2).mean(dim=axes, keepdim=True)
    X_hat = (X - mean) / torch.sqrt(var + eps)
    moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
    moving_var = momentum * moving_var + (1.0 - momentum) * var
    return gamma * X_hat + beta, moving_mean.detach(), moving_var.detach()


@pytest.mark.parametrize("shape", [(7, 5), (1, 3, 4, 4), (4, 1, 3, 5), (6, 3, 4, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_the_chapters_batch_norm_and_tinybns_agree_in_float64(shape, training):
    if training and shape[0] * int(numpy.prod(shape[2:])) < 2:
        pytest.skip("training needs two values per channel")
    rng = numpy.random.default_rng(sum(shape) + training)
    stats = (1, shape[1]) if len(shape) == 2 else (1, shape[1], 1, 1)
    arrays = {"x": rng.standard_normal(shape) * 3 + 1, "gamma": rng.uniform(0.5, 2, stats),
              "beta": rng.standard_normal(stats), "mean": rng.standard_normal(stats),
              "var": rng.uniform(0.5, 2, stats), "dy": rng.standard_normal(shape)}
    theirs = {name: torch.tensor(value, requires_grad=name in ("x", "gamma", "beta")) for name, value in arrays.items()}
    ours = {name: tinybn.tensor(value, requires_grad=name in ("x", "gamma", "beta")) for name, value in arrays.items()}
    y_t, mean_t, var_t = chapter_batch_norm(theirs["x"], theirs["gamma"], theirs["beta"], theirs["mean"],
                                            theirs["var"], 1e-5, 0.9, training)
    y, mean, var = F.batch_norm(ours["x"], ours["gamma"], ours["beta"], ours["mean"], ours["var"],
                                training=training, momentum=0.9, eps=1e-5)
    (y_t * theirs["dy"]).sum().backward()
    (y * ours["dy"]).sum().backward()
    numpy.testing.assert_allclose(y.numpy(), y_t.detach().numpy(), rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(mean.numpy(), mean_t.numpy(), rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(var.numpy(), var_t.numpy(), rtol=1e-12, atol=1e-12)
    for name in ("x", "gamma", "beta"):
        numpy.testing.assert_allclose(ours[name].grad, theirs[name].grad.numpy(), rtol=1e-10, atol=1e-12,
                                      err_msg=f"d{name}")


def test_the_chapters_layer_keeps_the_chapters_moving_averages():
    """Two training steps through the from-scratch layer, then prediction: the chapter's function, run the same
    way, gives the same moving averages and the same prediction."""
    rng = numpy.random.default_rng(3)
    layer = nn.BatchNorm(3, num_dims=4, dtype=numpy.float64)
    mean, var = torch.zeros((1, 3, 1, 1), dtype=torch.float64), torch.ones((1, 3, 1, 1), dtype=torch.float64)
    one, zero = torch.ones_like(mean), torch.zeros_like(mean)
    for _ in range(2):
        x = rng.standard_normal((5, 3, 2, 2)) * 2 - 1
        layer(tinybn.tensor(x))
        _, mean, var = chapter_batch_norm(torch.tensor(x), one, zero, mean, var, 1e-5, 0.9, True)
    numpy.testing.assert_allclose(layer.moving_mean.numpy(), mean.numpy(), rtol=1e-12)
    numpy.testing.assert_allclose(layer.moving_var.numpy(), var.numpy(), rtol=1e-12)
    x = rng.standard_normal((4, 3, 2, 2))
    predicted = layer.eval()(tinybn.tensor(x)).numpy()
    expected = chapter_batch_norm(torch.tensor(x), one, zero, mean, var, 1e-5, 0.9, False)[0].numpy()
    numpy.testing.assert_allclose(predicted, expected, rtol=1e-12, atol=1e-12)
