"""The normalization family: layer, group and instance norm against PyTorch in float64 (Hypothesis, every
memory layout, batch 1 and one channel included) and central differences; batch renorm and decorrelated
BN against their definitions, finite differences and batch norm where they reduce to it; every op on the
strict CuPy stand-in."""
from __future__ import annotations

import numpy
import pytest
from hypothesis import example, given, strategies as st

import tinybn
from tinybn import functional as F, nn
from tinybn.autograd import Tensor
from tinybn.functional.batchrenorm import renorm_limits
from tinybn.gradcheck import gradcheck

from props import LAYOUTS, assert_close, budget, with_layout

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (the comparison needs it)")
layouts = st.sampled_from(LAYOUTS)


def compare_with_torch(tinybn_op, torch_op, inputs, seed, rtol=1e-9, atol=1e-9):
    """``inputs``: (name, array, layout or None, requires_grad); the output and every gradient under a random dy."""
    rng = numpy.random.default_rng(seed + 1)
    ours = [Tensor(with_layout(a, layout) if layout else a, requires_grad=g) for _, a, layout, g in inputs]
    out = tinybn_op(*ours)
    dy = rng.standard_normal(out.shape)
    out.backward(dy)
    theirs = [torch.tensor(numpy.ascontiguousarray(a), requires_grad=g) for _, a, _, g in inputs]
    expected = torch_op(*theirs)
    expected.backward(torch.tensor(dy))
    assert_close("output", out.numpy(), expected.detach().numpy(), rtol, atol)
    for (name, _, _, needs), mine, reference in zip(inputs, ours, theirs):
        if needs:
            assert_close(f"gradient of {name}", mine.grad, reference.grad.numpy(), rtol, atol)


@needs_torch
@budget(80)
@given(n=st.integers(1, 4), rest=st.lists(st.integers(1, 4), min_size=1, max_size=3), normalized=st.integers(1, 3),
       affine=st.booleans(), layout=layouts, scale=st.sampled_from([1.0, 1e3]), seed=st.integers(0, 2**32 - 1))
@example(n=1, rest=[1], normalized=1, affine=True, layout="contiguous", scale=1.0, seed=0)   # one value: x̂ = 0
def test_layer_norm_matches_torch(n, rest, normalized, affine, layout, scale, seed):
    rng = numpy.random.default_rng(seed)
    shape = (n, *rest)
    normalized_shape = shape[len(shape) - min(normalized, len(rest)):]
    inputs = [("x", rng.standard_normal(shape) * scale + rng.uniform(-5, 5), layout, True)]
    if affine:
        inputs += [("weight", rng.standard_normal(normalized_shape), None, True),
                   ("bias", rng.standard_normal(normalized_shape), None, True)]
    compare_with_torch(lambda x, w=None, b=None: F.layer_norm(x, normalized_shape, w, b),
                       lambda x, w=None, b=None: torch.nn.functional.layer_norm(x, normalized_shape, w, b),
                       inputs, seed)


@needs_torch
@budget(80)
@given(n=st.integers(1, 4), groups=st.integers(1, 3), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), max_size=2), affine=st.booleans(), layout=layouts,
       seed=st.integers(0, 2**32 - 1))
@example(n=1, groups=1, per_group=1, spatial=[3, 2], affine=True, layout="channels_last", seed=0)
def test_group_norm_matches_torch(n, groups, per_group, spatial, affine, layout, seed):
    rng = numpy.random.default_rng(seed)
    channels = groups * per_group
    if per_group * int(numpy.prod(spatial)) == 1:
        spatial = [2]                                  # PyTorch needs more than one value per group
    shape = (n, channels, *spatial)
    inputs = [("x", rng.standard_normal(shape) * 3 + 1, layout, True)]
    if affine:
        inputs += [("weight", rng.standard_normal(channels), None, True), ("bias", rng.standard_normal(channels), None, True)]
    compare_with_torch(lambda x, w=None, b=None: F.group_norm(x, groups, w, b),
                       lambda x, w=None, b=None: torch.nn.functional.group_norm(x, groups, w, b), inputs, seed)


@needs_torch
@pytest.mark.parametrize("affine, track", [(False, False), (True, False), (True, True), (False, True)])
def test_instance_norm_layer_matches_torch(affine, track):
    rng = numpy.random.default_rng(3)
    ours = nn.InstanceNorm2d(3, affine=affine, track_running_stats=track, dtype=numpy.float64)
    theirs = torch.nn.InstanceNorm2d(3, affine=affine, track_running_stats=track, momentum=0.1).double()
    if affine:
        weight, bias = rng.standard_normal(3), rng.standard_normal(3)
        ours.weight.data, ours.bias.data = weight.copy(), bias.copy()
        theirs.weight.data, theirs.bias.data = torch.tensor(weight), torch.tensor(bias)
    for step in range(3):
        x = rng.standard_normal((4, 3, 5, 6)) * 2 + step
        numpy.testing.assert_allclose(ours(Tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(), atol=1e-10)
    if track:
        numpy.testing.assert_allclose(ours.moving_mean.data, theirs.running_mean.numpy(), atol=1e-12)
        # PyTorch averages unbiased per-example variances (30 values per channel and example); tinybn biased ones
        start = 0.9 ** 3                    # what is left of the initial 1 after three updates
        unbiased = start + (ours.moving_var.data - start) * 30 / 29
        numpy.testing.assert_allclose(unbiased, theirs.running_var.numpy(), rtol=1e-12)
        ours.eval(), theirs.eval()
        theirs.running_var.data = torch.tensor(ours.moving_var.data.copy())   # the same statistics, then compare
        x = rng.standard_normal((2, 3, 5, 6))
        numpy.testing.assert_allclose(ours(Tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(), atol=1e-10)


@needs_torch
def test_layers_match_torch_modules_and_their_argument_order():
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 3))
    pairs = [(nn.LayerNorm([3, 3], 1e-3, False, dtype=numpy.float64), torch.nn.LayerNorm([3, 3], 1e-3, False)),
             (nn.GroupNorm(2, 4, 1e-3, True, dtype=numpy.float64), torch.nn.GroupNorm(2, 4, 1e-3, True))]
    for ours, theirs in pairs:
        numpy.testing.assert_allclose(ours(Tensor(x)).data, theirs.double()(torch.tensor(x)).detach().numpy(),
                                      atol=1e-12)
        assert sorted(ours.state_dict()) == sorted(theirs.state_dict())


# ------------------------------------------------------------------------------------- batch renormalization

def renorm_factors(x, moving_mean, moving_var, r_max, d_max, eps=1e-5):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    mu, sigma_b = x.mean(axis=axes), numpy.sqrt(x.var(axis=axes) + eps)
    sigma = numpy.sqrt(moving_var + eps)
    return numpy.clip(sigma_b / sigma, 1 / r_max, r_max), numpy.clip((mu - moving_mean) / sigma, -d_max, d_max)


@budget(60)
@given(n=st.integers(2, 5), channels=st.integers(1, 3), spatial=st.sampled_from([0, 1, 3]), layout=layouts,
       r_max=st.sampled_from([1.0, 1.2, 3.0]), d_max=st.sampled_from([0.0, 0.3, 5.0]), seed=st.integers(0, 2**32 - 1))
def test_batch_renorm_is_its_definition_with_r_and_d_held_constant(n, channels, spatial, layout, r_max, d_max, seed):
    """Forward: the paper's formula. Backward: the gradients of batch norm with γ·r and γ·d + β, which is
    batch renorm with r and d constants, checked by central differences of that function."""
    rng = numpy.random.default_rng(seed)
    shape = (n, channels) + ((spatial, spatial + 1) if spatial else ())
    x = rng.standard_normal(shape) * rng.uniform(0.3, 3) + rng.uniform(-2, 2)
    gamma, beta = rng.standard_normal(channels), rng.standard_normal(channels)
    moving_mean, moving_var = rng.standard_normal(channels), rng.uniform(0.2, 4, channels)
    r, d = renorm_factors(x, moving_mean, moving_var, r_max, d_max)
    per = (1, channels) + (1,) * (x.ndim - 2)
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    z = (x - x.mean(axis=axes).reshape(per)) / numpy.sqrt(x.var(axis=axes) + 1e-5).reshape(per)
    expected = gamma.reshape(per) * (z * r.reshape(per) + d.reshape(per)) + beta.reshape(per)
    tensors = [Tensor(with_layout(x, layout), requires_grad=True), Tensor(gamma, requires_grad=True),
               Tensor(beta, requires_grad=True)]
    y, new_mean, new_var = F.batch_renorm(*tensors, moving_mean, moving_var, training=True, r_max=r_max, d_max=d_max,
                                          momentum=0.9)
    assert_close("output", y.data, expected, 1e-10, 1e-10)
    numpy.testing.assert_allclose(new_mean.data, 0.9 * moving_mean + 0.1 * x.mean(axis=axes), rtol=1e-12)
    dy = rng.standard_normal(shape)
    y.backward(dy)

    def with_constants(x, gamma, beta):
        return F.batch_norm(x, gamma * Tensor(r), gamma * Tensor(d) + beta, moving_mean, moving_var, training=True)[0]

    report = gradcheck(with_constants, [Tensor(x, requires_grad=True), Tensor(gamma, requires_grad=True),
                                        Tensor(beta, requires_grad=True)])
    assert report["ok"]
    reference = [Tensor(x, requires_grad=True), Tensor(gamma, requires_grad=True), Tensor(beta, requires_grad=True)]
    with_constants(*reference).backward(dy)
    for name, mine, theirs in zip(("x", "gamma", "beta"), tensors, reference):
        assert_close(f"gradient of {name}", mine.grad, theirs.grad, 1e-10, 1e-10)


def test_batch_renorm_reduces_to_batch_norm_and_predicts_like_it(device):
    rng = numpy.random.default_rng(1)
    x, gamma, beta = rng.standard_normal((6, 3, 2, 2)), rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    moving_mean, moving_var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    for training in (True, False):
        limits = dict(r_max=1.0, d_max=0.0) if training else {}
        mine = [tinybn.tensor(a, device=device, requires_grad=True) for a in (x, gamma, beta)]
        ref = [tinybn.tensor(a, device=device, requires_grad=True) for a in (x, gamma, beta)]
        stats = [tinybn.tensor(a, device=device).data for a in (moving_mean, moving_var)]
        y = F.batch_renorm(*mine, *stats, training=training, momentum=0.9, **limits)[0]
        y_bn = F.batch_norm(*ref, *stats, training=training, momentum=0.9)[0]
        dy = tinybn.tensor(rng.standard_normal(x.shape), device=device)
        (y * dy).sum().backward()
        (y_bn * dy).sum().backward()
        host = tinybn.backend.to_numpy
        numpy.testing.assert_allclose(host(y.data), host(y_bn.data), atol=1e-12)
        for a, b in zip(mine, ref):
            numpy.testing.assert_allclose(host(a.grad), host(b.grad), atol=1e-12)


def test_batch_renorm_warm_up_and_layer():
    assert renorm_limits(0, 3.0, 5.0, 100) == (1.0, 0.0)
    assert renorm_limits(50, 3.0, 5.0, 100) == (2.0, 2.5)
    assert renorm_limits(500, 3.0, 5.0, 100) == (3.0, 5.0) == renorm_limits(0, 3.0, 5.0, 0)
    layer = nn.BatchRenorm2d(warmup_steps=2)
    x = Tensor(numpy.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(numpy.float32))
    assert layer.num_features is None
    for expected in ((1.0, 0.0), (2.0, 2.5), (3.0, 5.0)):
        if layer.num_features:
            assert layer.limits() == expected
        layer(x)
    assert int(layer.num_batches_tracked.item()) == 3 and layer.momentum == 0.99
    for bad in (dict(r_max=0.5), dict(d_max=-1.0), dict(warmup_steps=-1)):
        with pytest.raises(ValueError):
            nn.BatchRenorm1d(3, **bad)


# -------------------------------------------------------------------------------------- decorrelated BN

@budget(30)
@given(n=st.integers(2, 6), channels=st.integers(1, 5), spatial=st.sampled_from([0, 2]), group_size=st.integers(1, 4),
       iterations=st.integers(1, 6), training=st.booleans(), layout=layouts, seed=st.integers(0, 2**32 - 1))
def test_decorrelated_batch_norm_gradients_by_central_differences(n, channels, spatial, group_size, iterations,
                                                                   training, layout, seed):
    rng = numpy.random.default_rng(seed)
    shape = (n, channels) + ((spatial, spatial) if spatial else ())
    x = rng.standard_normal(shape) + rng.uniform(-1, 1)
    whitening = numpy.eye(channels) + 0.1 * rng.standard_normal((channels, channels))
    inputs = [Tensor(with_layout(x, layout), requires_grad=True), Tensor(rng.standard_normal(channels), requires_grad=True),
              Tensor(rng.standard_normal(channels), requires_grad=True)]

    def whiten(x, gamma, beta):
        return F.decorrelated_batch_norm(x, gamma, beta, numpy.zeros(channels), whitening, training=training,
                                         group_size=group_size, iterations=iterations, eps=1e-2)[0]

    # eps 1e-2 keeps Σ well conditioned at these tiny batches; a badly conditioned Σ needs a larger finite-difference
    # step than gradcheck's 1e-6 (the next test), not another formula
    assert gradcheck(whiten, inputs)["ok"]


def test_decorrelated_batch_norm_on_a_badly_conditioned_covariance():
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 5))      # eigenvalues of Σ from 1e-3 to 9
    inputs = [Tensor(x, requires_grad=True), Tensor(rng.standard_normal(5), requires_grad=True),
              Tensor(rng.standard_normal(5), requires_grad=True)]
    report = gradcheck(lambda x, g, b: F.decorrelated_batch_norm(x, g, b, numpy.zeros(5), numpy.eye(5), training=True,
                                                                 group_size=5, iterations=7)[0], inputs, eps=1e-4)
    assert report["ok"] and report["worst_rel"] < 1e-5


def test_decorrelated_batch_norm_whitens_and_reduces_to_batch_norm_for_groups_of_one(device):
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 4)) + 3.0
    y, mean, whitening = F.decorrelated_batch_norm(Tensor(x), numpy.ones(4), numpy.zeros(4), numpy.zeros(4),
                                                   numpy.eye(4), training=True, group_size=4, iterations=40,
                                                   momentum=0.0, eps=1e-8)
    numpy.testing.assert_allclose(numpy.cov(y.data.T, bias=True), numpy.eye(4), atol=1e-4)   # whitened
    for iterations in (20, 100):       # the coupled iteration stays there (the uncoupled one overflowed at 15)
        again = F.decorrelated_batch_norm(Tensor(x), numpy.ones(4), numpy.zeros(4), numpy.zeros(4), numpy.eye(4),
                                          training=True, group_size=4, iterations=iterations, eps=1e-8)[0]
        numpy.testing.assert_allclose(numpy.cov(again.data.T, bias=True), numpy.eye(4), atol=1e-4)
    numpy.testing.assert_allclose(mean.data, x.mean(axis=0), atol=1e-12)
    # prediction mode with the batch's own μ and W gives the training output back
    again = F.decorrelated_batch_norm(Tensor(x), numpy.ones(4), numpy.zeros(4), mean.data, whitening.data,
                                      training=False)[0]
    numpy.testing.assert_allclose(again.data, y.data, atol=1e-10)
    # groups of one channel: S = 1, so W = 1/√(σ² + ε): batch norm, on every device
    x4 = rng.standard_normal((3, 2, 4, 4))
    gamma, beta = rng.standard_normal(2), rng.standard_normal(2)
    ours = F.decorrelated_batch_norm(tinybn.tensor(x4, device=device), tinybn.tensor(gamma, device=device),
                                     tinybn.tensor(beta, device=device), tinybn.tensor(numpy.zeros(2), device=device),
                                     tinybn.tensor(numpy.eye(2), device=device), training=True, group_size=1)[0]
    bn = F.batch_norm(Tensor(x4), gamma, beta, numpy.zeros(2), numpy.ones(2), training=True)[0]
    numpy.testing.assert_allclose(tinybn.backend.to_numpy(ours.data), bn.data, atol=1e-12)


def test_decorrelated_layer_keeps_block_diagonal_moving_whitening():
    layer = nn.DecorrelatedBatchNorm(5, group_size=2, momentum=0.0, dtype=numpy.float64)
    x = Tensor(numpy.random.default_rng(0).standard_normal((30, 5, 2, 2)))
    layer(x)
    w = layer.moving_whitening.data
    mask = numpy.zeros((5, 5), bool)
    for first, last in ((0, 2), (2, 4), (4, 5)):
        mask[first:last, first:last] = True
    assert numpy.all(w[~mask] == 0) and numpy.all(numpy.abs(numpy.diag(w)) > 0)
    layer.eval()
    y_eval = layer(x).data
    layer.train()
    numpy.testing.assert_allclose(y_eval, layer(x).data, atol=1e-10)    # momentum 0: the batch's own statistics
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer(Tensor(numpy.zeros((1, 5))))


# ----------------------------------------------------------------------------- every op on the device path

@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "batch_renorm", "decorrelated_batch_norm"])
def test_the_device_path_on_the_strict_stand_in(name):
    rng = numpy.random.default_rng(4)
    x, gamma, beta = rng.standard_normal((3, 4, 2, 2)), rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    calls = {
        "layer_norm": lambda x, g, b, d: F.layer_norm(x, (4, 2, 2)),
        "group_norm": lambda x, g, b, d: F.group_norm(x, 2, g, b),
        "batch_renorm": lambda x, g, b, d: F.batch_renorm(x, g, b, tinybn.tensor(numpy.zeros(4), device=d).data,
                                                          tinybn.tensor(numpy.ones(4), device=d).data,
                                                          training=True)[0],
        "decorrelated_batch_norm": lambda x, g, b, d: F.decorrelated_batch_norm(
            x, g, b, tinybn.tensor(numpy.zeros(4), device=d).data, tinybn.tensor(numpy.eye(4), device=d).data,
            training=True, group_size=3)[0],
    }
    results = []
    for device in ("cpu", "strict"):
        tensors = [tinybn.tensor(a, device=device, requires_grad=True) for a in (x, gamma, beta)]
        y = calls[name](*tensors, device)
        (y * tinybn.tensor(numpy.linspace(-1, 1, y.size).reshape(y.shape), device=device)).sum().backward()
        results.append([tinybn.backend.to_numpy(a) for a in (y.data, tensors[0].grad)])
    for mine, host in zip(*results):
        numpy.testing.assert_allclose(mine, host, atol=1e-12)


def test_argument_checks_say_what_is_wrong():
    x = Tensor(numpy.zeros((2, 6, 3, 3)))
    with pytest.raises(ValueError, match="divides the 6 channels"):
        F.group_norm(x, 4)
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, (4, 3))
    with pytest.raises(ValueError, match="does not divide"):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="eps must be positive"):
        nn.LayerNorm(3, eps=0)
    with pytest.raises(ValueError, match="moving_whitening has shape"):
        F.decorrelated_batch_norm(x, numpy.ones(6), numpy.zeros(6), numpy.zeros(6), numpy.eye(5), training=True)


def test_found_by_an_outside_test():
    ints = Tensor(numpy.array([[1, 2, 3, 4, 5]]))
    for call in (lambda: F.layer_norm(ints, 5), lambda: F.group_norm(ints, 1),
                 lambda: F.batch_norm(ints, numpy.ones(5), numpy.zeros(5), numpy.zeros(5), numpy.ones(5), training=False)):
        with pytest.raises(ValueError, match="floating-point input"):
            call()
    x = Tensor(numpy.random.default_rng(0).standard_normal((2, 4, 3, 3)))
    numpy.testing.assert_array_equal(nn.GroupNorm(numpy.int64(2), 4)(x).data, nn.GroupNorm(2, 4)(x).data)
    assert nn.LayerNorm(numpy.int64(3)).normalized_shape == (3,) == nn.LayerNorm([numpy.int64(3)]).normalized_shape
    nn.DecorrelatedBatchNorm(4, group_size=numpy.int64(2), iterations=numpy.int64(2))(x)
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, 5.0)
    layer = nn.InstanceNorm2d(numpy.int64(4), track_running_stats=True)
    with pytest.raises(ValueError, match="more than one position"):
        layer(Tensor(numpy.zeros((2, 4, 1, 1))))
    with pytest.raises(ValueError, match="4 channels"):
        layer(Tensor(numpy.zeros((2, 3, 2, 2))))
    assert int(layer.num_batches_tracked.item()) == 0           # failed calls changed nothing
    for make in (lambda: nn.InstanceNorm2d(3, momentum=None), lambda: nn.DecorrelatedBatchNorm(3, momentum=None)):
        with pytest.raises(ValueError, match="cumulative average"):
            make()
    with pytest.raises(ValueError, match="at least 0"):
        renorm_limits(-5, 3.0, 5.0, 10)


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "group_norm", "batch_renorm", "decorrelated"])
def test_float32_beyond_the_squares_range_normalizes_right(name):
    """Issue 21: float32 BN/LN/GN whose |x − μ| passed about 1.8e19 overflowed the variance to inf and returned β
    everywhere, with only a NumPy warning (PyTorch gives NaN). The true output has standard deviation 1."""
    x64 = numpy.random.default_rng(0).standard_normal((8, 3, 2, 2)) * 1e20
    ones, zeros = numpy.ones(3), numpy.zeros(3)
    calls = {
        "batch_norm": lambda x, dt: F.batch_norm(x, ones.astype(dt), zeros.astype(dt), zeros.astype(dt),
                                                 ones.astype(dt), training=True)[0],
        "layer_norm": lambda x, dt: F.layer_norm(x, (3, 2, 2)),
        "group_norm": lambda x, dt: F.group_norm(x, 3),
        "batch_renorm": lambda x, dt: F.batch_renorm(x, ones.astype(dt), zeros.astype(dt), zeros.astype(dt),
                                                     ones.astype(dt), training=True, r_max=1.0, d_max=0.0)[0],
        "decorrelated": lambda x, dt: F.decorrelated_batch_norm(x, ones.astype(dt), zeros.astype(dt), zeros.astype(dt),
                                                                numpy.eye(3, dtype=dt), training=True, group_size=3)[0],
    }
    with numpy.errstate(over="raise"):       # no overflow left to warn about
        with pytest.raises(FloatingPointError):
            numpy.square(x64.astype(numpy.float32))
    for family in tinybn.kernels.available():             # the reference, and each kernel family where it applies
        with numpy.errstate(over="ignore"), tinybn.kernels.using(family):
            y32 = calls[name](Tensor(x64.astype(numpy.float32), requires_grad=True), numpy.float32)
        y64 = calls[name](Tensor(x64.astype(numpy.float32).astype(numpy.float64)), numpy.float64)
        assert y32.dtype == numpy.float32 and numpy.isfinite(y32.data).all(), family
        numpy.testing.assert_allclose(y32.data, y64.data, atol=1e-4 if name == "decorrelated" else 1e-5, err_msg=family)
        assert 0.5 < float(y32.data.astype(numpy.float64).std()) < 1.5


def test_sync_batch_renorm_is_built_directly_as_the_conversion_builds_it():
    """Found by the outside test of issue 21: SyncBatchRenorm(4) raised TypeError (its arguments were shifted by one
    through the method resolution order)."""
    from tinybn.communicator import LocalCommunicator

    comm = LocalCommunicator()
    direct = nn.SyncBatchRenorm(4, r_max=2.0, d_max=1.0, warmup_steps=0, comm=comm, dtype=numpy.float64)
    converted = nn.convert_sync(nn.BatchRenorm2d(4, r_max=2.0, d_max=1.0, warmup_steps=0, dtype=numpy.float64), comm)
    assert nn.SyncBatchRenorm().num_features is None and direct.comm is comm and direct.gamma.dtype == numpy.float64
    x = Tensor(numpy.random.default_rng(0).standard_normal((6, 4, 2, 2)))
    for _ in range(2):
        numpy.testing.assert_allclose(direct(x).data, converted(x).data, atol=1e-12)
    numpy.testing.assert_allclose(direct.moving_var.numpy(), converted.moving_var.numpy(), atol=1e-12)
