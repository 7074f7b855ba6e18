"""Model-level properties, over generated models, batches and structures.

* In prediction mode a model's output for a batch equals its output for each example alone and for any
  regrouping of the batch (a batch of one included), under every kernel family, whatever the input's layout.
* ``parameters()`` and ``buffers()`` list every tensor once, however modules are shared and nested, and
  one SGD step moves each parameter by exactly lr·grad.
* ``state_dict`` round-trips; a failed ``load_state_dict`` changes nothing, lazy layers included.
"""

import numpy
import pytest
from hypothesis import given, strategies as st

import tinybn
from tinybn import functional as F, kernels, nn
from tinybn.app.models import MODELS, build_model
from tinybn.optim import SGD

from props import LAYOUTS, assert_close, budget, with_layout


def trained(model_name, seed, steps=1):
    """A float64 model after ``steps`` SGD steps on random images, so its moving averages are its own."""
    tinybn.manual_seed(seed)
    net = build_model(model_name)
    rng = numpy.random.default_rng(seed)
    net(tinybn.tensor(rng.random((4, 1, 28, 28)).astype(numpy.float32)))        # lazy layers take their size
    net.to(dtype=numpy.float64)
    optimizer = SGD(net.parameters(), lr=0.5)
    for _ in range(steps):
        loss = F.cross_entropy(net(tinybn.tensor(rng.random((8, 1, 28, 28)))), tinybn.tensor(rng.integers(0, 10, 8)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@budget(25)
@given(model_name=st.sampled_from(MODELS), n=st.integers(1, 7), cuts=st.lists(st.integers(1, 6), max_size=3),
       layout=st.sampled_from(LAYOUTS), family=st.sampled_from(kernels.available()), seed=st.integers(0, 2**16))
def test_prediction_of_a_batch_equals_prediction_of_its_parts(model_name, n, cuts, layout, family, seed):
    net = trained(model_name, seed)
    images = numpy.random.default_rng(seed + 1).random((n, 1, 28, 28))
    with kernels.using(family), tinybn.no_grad():
        whole = net(tinybn.Tensor(with_layout(images, layout))).numpy()
        alone = numpy.concatenate([net(tinybn.Tensor(images[k:k + 1])).numpy() for k in range(n)])
        bounds = sorted({0, n, *(c for c in cuts if c < n)})
        regrouped = numpy.concatenate([net(tinybn.Tensor(with_layout(images[a:b], layout))).numpy()
                                       for a, b in zip(bounds, bounds[1:])])
    assert numpy.isfinite(whole).all()
    assert_close("each example alone", alone, whole, rtol=1e-10, atol=1e-10)
    assert_close(f"regrouped at {bounds}", regrouped, whole, rtol=1e-10, atol=1e-10)


@st.composite
def shared_structures(draw):
    """A model built from a few layers, some used more than once, nested at random depth."""
    pool = [nn.Linear(3, 3) for _ in range(draw(st.integers(1, 3)))] + [nn.BatchNorm1d(3)]
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=6))
    layers = []
    for k in picks:
        layers += [pool[k], nn.Sigmoid()]
    while len(layers) > 2 and draw(st.booleans()):   # wrap a random run of layers in a nested Sequential
        start = draw(st.integers(0, len(layers) - 2))
        stop = draw(st.integers(start + 1, len(layers)))
        layers[start:stop] = [nn.Sequential(*layers[start:stop])]
    return nn.Sequential(*layers), [pool[k] for k in dict.fromkeys(picks)]


@budget(80)
@given(structure=shared_structures(), seed=st.integers(0, 2**16))
def test_parameters_are_unique_and_stepped_once(structure, seed):
    net, used = structure
    params = net.parameters()
    assert len({id(p) for p in params}) == len(params)
    expected = [p for layer in used for p in layer.parameters()]          # first-seen order
    assert [id(p) for p in params] == [id(p) for p in expected]
    buffers = net.buffers()
    assert len({id(b) for b in buffers}) == len(buffers)
    names = [name for name, _ in net.named_parameters()]
    assert len(set(names)) == len(names)
    x = tinybn.tensor(numpy.random.default_rng(seed).standard_normal((4, 3)).astype(numpy.float32))
    net(x).sum().backward()
    before = [p.numpy().copy() for p in params]
    grads = [p.grad.copy() for p in params]
    SGD(net.parameters(), lr=0.1).step()
    for p, old, grad in zip(params, before, grads):
        numpy.testing.assert_allclose(p.numpy(), old - 0.1 * grad, rtol=1e-6, atol=1e-7)


@budget(25)
@given(model_name=st.sampled_from(MODELS), steps=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_state_dict_round_trips(model_name, steps, seed):
    source = trained(model_name, seed, steps)
    target = build_model(model_name).to(dtype=numpy.float64)
    target.load_state_dict(source.state_dict())
    for (name, a), (other, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert name == other
        numpy.testing.assert_array_equal(a, b, err_msg=name)
    x = tinybn.Tensor(numpy.random.default_rng(seed).random((3, 1, 28, 28)))
    numpy.testing.assert_array_equal(target.eval()(x).numpy(), source(x).numpy())


@budget(60)
@given(model_name=st.sampled_from(MODELS), lazy_target=st.booleans(),
       damage=st.sampled_from(["drop", "extra", "reshape", "resize"]), data=st.data())
def test_a_failed_load_changes_nothing(model_name, lazy_target, damage, data):
    source = trained(model_name, 0)
    state = source.state_dict()
    name = data.draw(st.sampled_from(sorted(state)))
    if damage == "drop":
        del state[name]
    elif damage == "extra":
        state["extra.weight"] = numpy.zeros(2)
    elif damage == "reshape":
        state[name] = state[name].reshape(-1, 1)
    else:
        state[name] = numpy.zeros(tuple(n + 1 for n in state[name].shape) or (2,))
    target = build_model(model_name)
    if not lazy_target:
        target(tinybn.tensor(numpy.zeros((2, 1, 28, 28), numpy.float32)))
    before = {n: t.numpy().copy() for n, t in (*target.named_parameters(), *target.named_buffers())
              if nn.is_materialized(t)}
    lazy_before = [n for n, t in target.named_parameters() if not nn.is_materialized(t)]
    with pytest.raises((KeyError, ValueError)):
        target.load_state_dict(state)
    after = {n: t.numpy() for n, t in (*target.named_parameters(), *target.named_buffers()) if nn.is_materialized(t)}
    assert after.keys() == before.keys()
    for n in before:
        numpy.testing.assert_array_equal(after[n], before[n], err_msg=n)
    assert [n for n, t in target.named_parameters() if not nn.is_materialized(t)] == lazy_before
