"""The measurements of examples/controversy.py on tiny models whose answers are known: a linear model under a
squared loss, whose landscape is exactly quadratic; a model whose first layer is frozen, whose second layer's
internal covariate shift must be 0; and the same measure against an update made by hand."""
import copy
import sys
from pathlib import Path

import numpy
import pytest

import tinybn
from tinybn import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import controversy  # noqa: E402

rng = numpy.random.default_rng(4)


def _squared_loss(X, Y):
    return lambda model: ((model(tinybn.tensor(X)) - tinybn.tensor(Y)) ** 2).mean()


def test_a_linear_models_landscape_is_the_quadratic_it_must_be():
    """L(w) = mean((A w - y)^2) with A = [X, 1]: g = 2 A^T r / n and H = 2 A^T A / n are exact, so along -g the
    loss is L - eta |g|^2 + eta^2 g^T H g / 2, the gradient moves by eta |H g|, and beta-smoothness is |H g| / |g|
    at every step size."""
    X, Y = rng.standard_normal((20, 4)), rng.standard_normal((20, 1))
    model = nn.Linear(4, 1, dtype=numpy.float64)
    weight, bias = model.weight.numpy().reshape(-1), model.bias.numpy().reshape(-1)
    A, theta = numpy.hstack([X, numpy.ones((20, 1))]), numpy.concatenate([weight, bias])
    residual = A @ theta - Y[:, 0]
    loss, g, H = numpy.mean(residual ** 2), 2 * A.T @ residual / 20, 2 * A.T @ A / 20
    etas = (0.01, 0.1, 0.3)
    found = controversy.landscape(model, _squared_loss(X, Y), etas)
    expected = [loss - eta * g @ g + eta ** 2 * g @ H @ g / 2 for eta in etas]
    numpy.testing.assert_allclose(found["losses"], expected, rtol=1e-10)
    numpy.testing.assert_allclose(found["gradient_changes"], [eta * numpy.linalg.norm(H @ g) for eta in etas], rtol=1e-9)
    assert found["loss_variation"] == pytest.approx(max(expected) - min(expected), rel=1e-9)
    assert found["beta_smoothness"] == pytest.approx(numpy.linalg.norm(H @ g) / numpy.linalg.norm(g), rel=1e-9)
    numpy.testing.assert_array_equal(model.weight.numpy().reshape(-1), weight)     # the weights put back


def _two_layers(frozen_first: bool):
    tinybn.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Sigmoid(), nn.Linear(5, 2)).to(dtype=numpy.float64)
    if frozen_first:
        for p in model[0].parameters():
            p.requires_grad = False
    X, labels = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    return model, lambda m: tinybn.functional.cross_entropy(m(tinybn.tensor(X)), tinybn.tensor(labels))


def test_when_the_previous_layers_do_not_change_the_shift_is_zero():
    model, loss_of = _two_layers(frozen_first=True)
    model[1].gamma.requires_grad = model[1].beta.requires_grad = False      # the whole first layer frozen
    (distance, cosine), = controversy.internal_covariate_shift(model, loss_of, lr=1.0)
    assert distance == 0.0 and cosine == pytest.approx(1.0, abs=1e-12)


def test_the_shift_equals_an_update_made_by_hand_and_changes_nothing():
    model, loss_of = _two_layers(frozen_first=False)
    state = {name: value.copy() for name, value in model.state_dict().items()}
    (distance, cosine), = controversy.internal_covariate_shift(model, loss_of, lr=0.5)
    for name, value in model.state_dict().items():          # weights and running statistics as they were
        numpy.testing.assert_array_equal(value, state[name], err_msg=name)
    by_hand = copy.deepcopy(model)
    loss_of(by_hand).backward()
    before = by_hand[3].weight.grad.copy()
    with tinybn.no_grad():
        for layer in (by_hand[0], by_hand[1]):               # the layers before the second: SGD, lr 0.5
            for p in layer.parameters():
                p.data = p.data - 0.5 * p.grad
    by_hand.zero_grad()
    loss_of(by_hand).backward()
    after = by_hand[3].weight.grad
    assert distance > 1e-6 and distance == pytest.approx(float(numpy.linalg.norm(before - after)), rel=1e-10)
    assert cosine == pytest.approx(float((before * after).sum() / numpy.linalg.norm(before) / numpy.linalg.norm(after)),
                                   rel=1e-10)


def test_noisy_bn_shifts_only_in_training_and_anew_every_step():
    tinybn.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype=numpy.float64)
    x = tinybn.tensor(rng.standard_normal((16, 3)))
    clean = model(x).numpy()
    handles = controversy.add_noise(model, numpy.random.default_rng(0))
    first, second = model(x).numpy(), model(x).numpy()
    assert not numpy.allclose(first, clean) and not numpy.allclose(first, second)
    model.eval()
    quiet = model(x).numpy()
    for handle in handles:
        handle.remove()
    numpy.testing.assert_array_equal(quiet, model(x).numpy())


def test_the_measurements_put_back_gradients_and_the_mode_too():
    """Found by the outside test: measuring between backward() and step() wiped every .grad, so the step did
    nothing; and a model in eval mode was measured in eval mode."""
    model, loss_of = _two_layers(frozen_first=False)
    loss_of(model).backward()
    grads = [p.grad.copy() for p in model.parameters()]
    model.eval()
    controversy.internal_covariate_shift(model, loss_of, lr=0.5)
    controversy.landscape(model, loss_of, (0.1,))
    assert not model.training and not model[1].training
    for p, grad in zip(model.parameters(), grads):
        numpy.testing.assert_array_equal(p.grad, grad)


def test_a_batch_norm_before_the_first_layer_is_updated_with_the_previous_layers():
    tinybn.manual_seed(2)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).to(dtype=numpy.float64)
    groups = controversy.layers_of(model)
    assert [len(group) for group in groups] == [4, 2] and groups[0][0] is model[1].weight
    assert any(p is model[0].gamma for p in groups[0])


def test_a_random_forward_is_refused_and_bad_arguments_get_one_line(capsys):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(dtype=numpy.float64)
    with pytest.raises(ValueError, match="Dropout: its forward is random"):
        controversy.landscape(model, lambda m: m(tinybn.tensor(numpy.ones((2, 3)))).sum())
    for argv in (["--every", "0"], ["--seeds", "x"], ["--replot", "--out", "/nonexistent/folder"]):
        with pytest.raises(SystemExit):
            controversy.main(argv)
        assert ": error: " in capsys.readouterr().err.strip().splitlines()[-1]
