"""Precise BN: tinybn.nn.recompute_batch_norm_statistics against statistics computed directly.

The oracle for a layer's population statistics is NumPy's mean and variance over the concatenation of
everything the layer saw, in float64; for the first BN layer that is just its input over the whole data,
so the result must not depend on how the data was cut into batches.
"""
import numpy
import pytest
from hypothesis import assume, given, strategies as st

import tinybn
from tinybn import functional as F, nn
from tinybn.nn import recompute_batch_norm_statistics as recompute

from props import LAYOUTS, budget, with_layout


def dense_model():
    tinybn.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4, dtype=numpy.float64), nn.BatchNorm1d(dtype=numpy.float64), nn.Sigmoid(),
                         nn.Dropout(0.5), nn.Linear(4, 3, dtype=numpy.float64), nn.BatchNorm(3, 2, dtype=numpy.float64))


def conv_model(channels=3):
    tinybn.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, channels, 3, dtype=numpy.float64), nn.BatchNorm2d(dtype=numpy.float64),
                         nn.ReLU(), nn.Conv2d(channels, 1, 2, stride=2, dtype=numpy.float64),
                         nn.BatchNorm(1, 4, dtype=numpy.float64))


def cut(data, sizes):
    """``data`` cut into consecutive batches of the given sizes (the rest in a last batch)."""
    edges = numpy.cumsum([0, *sizes])
    pieces = [data[a:b] for a, b in zip(edges[:-1], edges[1:])]
    if edges[-1] < len(data):
        pieces.append(data[edges[-1]:])
    return [p for p in pieces if len(p)]


def population(values, layer):
    axes = (0,) if values.ndim == 2 else (0, 2, 3)
    shape = layer.moving_mean.shape
    return values.mean(axis=axes).reshape(shape), values.var(axis=axes).reshape(shape)


def bn_inputs(model, batches):
    """What each BN layer of ``model`` sees when it normalizes every batch with its own statistics (the
    functional ops, layer by layer, without the layers' own forward), concatenated over the batches."""
    seen = {}
    for batch in batches:
        h = tinybn.tensor(batch)
        for i, layer in enumerate(model):
            if isinstance(layer, (nn.BatchNorm, nn.BatchNorm1d)):
                seen.setdefault(i, []).append(h.numpy())
                h = F.batch_norm(h, layer.gamma, layer.beta, layer.moving_mean, layer.moving_var, training=True,
                                 eps=layer.eps)[0]
            elif isinstance(layer, nn.Dropout):
                continue                      # prediction mode
            else:
                h = layer(h)
    return {i: numpy.concatenate(values) for i, values in seen.items()}


@budget(40)
@given(n=st.integers(2, 40), sizes=st.lists(st.integers(1, 13), min_size=1, max_size=6), seed=st.integers(0, 2**31),
       conv=st.booleans(), channels=st.integers(1, 3), layout=st.sampled_from(LAYOUTS))
def test_statistics_are_those_of_all_the_values_seen(n, sizes, seed, conv, channels, layout):
    rng = numpy.random.default_rng(seed)
    model = conv_model(channels) if conv else dense_model()       # one channel too, in both BN layers
    data = rng.standard_normal((n, 2, 6, 5) if conv else (n, 5)) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
    batches = [b for b in cut(data, sizes) if len(b) >= 2 or conv]   # a batch of 1 only where H·W gives values
    assume(batches)
    model(tinybn.tensor(batches[0]))          # materialize the lazy layer
    expected = bn_inputs(model, batches)
    used = recompute(model, [with_layout(b, layout) for b in batches])    # each batch in the drawn memory layout
    assert used == len(batches)
    for i, values in expected.items():
        mean, var = population(values, model[i])
        numpy.testing.assert_allclose(model[i].moving_mean.numpy(), mean, rtol=1e-9, atol=1e-12)
        numpy.testing.assert_allclose(model[i].moving_var.numpy(), var, rtol=1e-9, atol=1e-12)
    # the first layer's statistics are its input's over the whole data, however it was cut
    first = 1
    whole = bn_inputs(model, [numpy.concatenate(batches)])[first]
    numpy.testing.assert_allclose(model[first].moving_mean.numpy(), population(whole, model[first])[0], rtol=1e-9,
                                  atol=1e-12)


def test_prediction_uses_the_recomputed_statistics_and_nothing_else_changes():
    model = dense_model()
    model(tinybn.tensor(numpy.ones((2, 5))))
    model.train()
    model[3].eval()                            # a mixed mode, to be given back as found
    params = [p.numpy().copy() for p in model.parameters()]
    tracked = model[1].num_batches_tracked.numpy().copy()
    state = tinybn.random.generator(numpy).bit_generator.state
    data = numpy.random.default_rng(1).standard_normal((64, 5))
    recompute(model, ((tinybn.tensor(data[i:i + 16]), None) for i in range(0, 64, 16)))
    assert [m.training for m in model] == [True, True, True, False, True, True] and model.training
    for before, p in zip(params, model.parameters()):
        numpy.testing.assert_array_equal(before, p.numpy())
        assert p.grad is None
    numpy.testing.assert_array_equal(model[1].num_batches_tracked.numpy(), tracked)
    assert tinybn.random.generator(numpy).bit_generator.state == state     # no dropout mask was drawn
    model.eval()
    h = model[0](tinybn.tensor(data))
    y = model[1](h).numpy()
    mean, var = h.numpy().mean(0), h.numpy().var(0)
    numpy.testing.assert_allclose(y, (h.numpy() - mean) / numpy.sqrt(var + model[1].eps), rtol=1e-9, atol=1e-9)


def test_a_failing_pass_changes_nothing():
    model = dense_model()
    model(tinybn.tensor(numpy.ones((2, 5))))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    good = numpy.random.default_rng(2).standard_normal((8, 5))
    with pytest.raises(ValueError, match="expects 5 channels"):
        recompute(model, [good, numpy.ones((8, 7)), good])
    for key, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, before[key])
    assert all(m.training for m in model.modules())
    assert all(not m.__dict__.get("_forward_hooks") for m in model.modules())     # the pass leaves no hook
    model.eval()
    recompute(model, [good])                   # the layers are usable afterwards, and eval mode comes back
    assert not any(m.training for m in model.modules())


def test_arguments_are_checked():
    model = dense_model()
    data = numpy.ones((4, 5))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_batches"):
            recompute(model, [data], bad)
    with pytest.raises(ValueError, match="no batch"):
        recompute(model, [])
    with pytest.raises(ValueError, match="no normalization layer whose statistics could be recomputed"):
        recompute(nn.Sequential(nn.Linear(5, 2)), [data])
    assert recompute(model, iter([data] * 5), num_batches=2) == 2


def test_a_layer_used_twice_counts_both_calls():
    tinybn.manual_seed(0)
    bn = nn.BatchNorm1d(3, dtype=numpy.float64)
    model = nn.Sequential(bn, nn.Linear(3, 3, dtype=numpy.float64), bn)
    x = numpy.random.default_rng(3).standard_normal((10, 3)) * 4 + 1
    recompute(model, [x])
    middle = model[1](F.batch_norm(tinybn.tensor(x), bn.gamma, bn.beta, numpy.zeros(3), numpy.ones(3),
                                   training=True)[0]).numpy()
    both = numpy.concatenate([x, middle])
    numpy.testing.assert_allclose(bn.moving_mean.numpy(), both.mean(0), rtol=1e-9)
    numpy.testing.assert_allclose(bn.moving_var.numpy(), both.var(0), rtol=1e-9)


def test_float32_model_on_fashion_mnist_sized_values():
    """float32 layers with a large offset: the float64 combination keeps the variance exact."""
    tinybn.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2))
    x = (numpy.random.default_rng(4).standard_normal((4096, 2)) * 0.01 + 1000).astype(numpy.float32)
    recompute(model, [x[i:i + 256] for i in range(0, 4096, 256)])
    numpy.testing.assert_allclose(model[0].moving_mean.numpy(), x.astype(numpy.float64).mean(0), rtol=1e-6)
    numpy.testing.assert_allclose(model[0].moving_var.numpy(), x.astype(numpy.float64).var(0), rtol=2e-2)


def test_batches_may_be_lists_foreign_arrays_or_empty():
    torch = pytest.importorskip("torch")
    model = dense_model()
    data = numpy.random.default_rng(5).standard_normal((12, 5))
    used = recompute(model, [(torch.from_numpy(data[:6]), None), data[6:].tolist(), numpy.zeros((0, 5))],
                     numpy.int64(3))
    assert used == 2                            # the empty batch is not counted
    h = model[0](tinybn.tensor(data)).numpy()
    numpy.testing.assert_allclose(model[1].moving_mean.numpy(), h.mean(0), rtol=1e-9)


def test_on_every_device_the_statistics_stay_there_and_match_the_host(device):
    """On the strict CuPy stand-in, any host array mixed into the pass raises; the values match NumPy's."""
    data = numpy.random.default_rng(6).standard_normal((24, 5))
    results = {}
    for where in ("cpu", device):
        model = dense_model().to(where)
        used = recompute(model, [data[:10], tinybn.tensor(data[10:], device=where)])
        assert used == 2 and model[1].moving_mean.device == tinybn.backend.resolve_device(where)[0]
        results[where] = [model[i].moving_var.numpy() for i in (1, 5)]
    for host, other in zip(results["cpu"], results[device]):
        numpy.testing.assert_allclose(other, host, rtol=1e-12)


# ------------------------------------------------------------------ decorrelated batch norm (whitening)

def whitening_oracle(values, group_size, eps):
    """Σ^(−1/2) by an eigendecomposition, block by block, of the biased covariance of every value per channel,
    with ε on the diagonal, and the mean: an oracle apart from the Newton–Schulz code."""
    X = (values if values.ndim == 2 else values.transpose(0, 2, 3, 1).reshape(-1, values.shape[1])).T
    mean, covariance = X.mean(axis=1), numpy.cov(X, bias=True).reshape(X.shape[0], X.shape[0])
    W = numpy.zeros_like(covariance)
    for first in range(0, len(W), group_size):
        block = slice(first, first + group_size)
        lam, U = numpy.linalg.eigh(covariance[block, block] + eps * numpy.eye(len(W[block])))
        W[block, block] = U @ numpy.diag(lam ** -0.5) @ U.T
    return mean, W


@budget(30)
@given(n=st.integers(2, 30), sizes=st.lists(st.integers(1, 11), min_size=1, max_size=5), seed=st.integers(0, 2**31),
       conv=st.booleans(), channels=st.integers(1, 6), group_size=st.integers(1, 4), layout=st.sampled_from(LAYOUTS))
def test_decorrelated_statistics_are_the_whitening_of_all_the_values_seen(n, sizes, seed, conv, channels, group_size,
                                                                         layout):
    """The mean and whitening matrix after the pass are those of one batch holding every batch: equal to
    training mode's on the concatenation (momentum 0), and, with enough iterations, to Σ^(−1/2)."""
    rng = numpy.random.default_rng(seed)
    mixing = numpy.eye(channels) + rng.uniform(-0.5, 0.5, (channels, channels))   # correlated channels
    data = rng.standard_normal((n, 4, 3, channels) if conv else (n, channels)) @ mixing * rng.uniform(0.1, 10)
    data = (data.transpose(0, 3, 1, 2) if conv else data) + rng.uniform(-5, 5, channels).reshape(
        (1, channels) + (1, 1) * conv)
    batches = [b for b in cut(data, sizes) if len(b) >= 2 or conv]    # a batch of 1 only where H·W gives values
    assume(batches)
    layer = nn.DecorrelatedBatchNorm(channels, group_size=group_size, iterations=40, dtype=numpy.float64)
    layer.moving_mean.data = rng.standard_normal(channels)            # whatever the buffers held before is replaced
    assert recompute(layer, [with_layout(b, layout) for b in batches]) == len(batches)
    assert layer.training
    everything = numpy.concatenate(batches)
    _, mean, W = F.decorrelated_batch_norm(tinybn.tensor(everything), layer.gamma, layer.beta, layer.moving_mean,
                                           layer.moving_whitening, training=True, group_size=group_size,
                                           iterations=40, momentum=0.0, eps=layer.eps)
    numpy.testing.assert_allclose(layer.moving_mean.numpy(), mean.numpy(), rtol=1e-9, atol=1e-9)
    numpy.testing.assert_allclose(layer.moving_whitening.numpy(), W.numpy(), rtol=1e-7, atol=1e-7)
    mean, W = whitening_oracle(everything, group_size, layer.eps)
    numpy.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-9, atol=1e-9)
    scale = abs(W).max()
    numpy.testing.assert_allclose(layer.moving_whitening.numpy() / scale, W / scale, atol=1e-6)


def test_decorrelated_layer_after_batch_norm_sees_its_normalized_input_and_prediction_uses_the_result():
    tinybn.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, dtype=numpy.float64), nn.BatchNorm1d(6, dtype=numpy.float64), nn.Sigmoid(),
                          nn.DecorrelatedBatchNorm(6, group_size=4, dtype=numpy.float64))
    data = numpy.random.default_rng(3).standard_normal((48, 5))
    batches = [data[i:i + 12] for i in range(0, 48, 12)]
    params = [p.numpy().copy() for p in model.parameters()]
    recompute(model, batches)
    for before, p in zip(params, model.parameters()):
        numpy.testing.assert_array_equal(before, p.numpy())
    seen = []      # what the whitening layer saw: each batch through Linear, BN on that batch's statistics, sigmoid
    for batch in batches:
        h = model[0](tinybn.tensor(batch))
        h = F.batch_norm(h, model[1].gamma, model[1].beta, model[1].moving_mean, model[1].moving_var, training=True,
                         eps=model[1].eps)[0]
        seen.append(model[2](h).numpy())
    seen = numpy.concatenate(seen)
    layer = model[3]
    _, mean, W = F.decorrelated_batch_norm(tinybn.tensor(seen), layer.gamma, layer.beta, layer.moving_mean,
                                           layer.moving_whitening, training=True, group_size=4, momentum=0.0)
    numpy.testing.assert_allclose(layer.moving_mean.numpy(), mean.numpy(), rtol=1e-10, atol=1e-12)
    numpy.testing.assert_allclose(layer.moving_whitening.numpy(), W.numpy(), rtol=1e-8, atol=1e-10)
    model.eval()
    x = tinybn.tensor(numpy.random.default_rng(4).standard_normal((3, 6)))
    numpy.testing.assert_allclose(layer(x).numpy(), (x.numpy() - mean.numpy()) @ W.numpy().T, rtol=1e-10,
                                  atol=1e-12)


# ------------------------------------------------------------------ issue 21: precise statistics over ranks

@pytest.mark.parametrize("synchronized", [True, False])
@pytest.mark.parametrize("counts", [(3, 3), (2, 4)])
def test_ranks_passing_their_own_batches_get_the_statistics_of_all_of_them_on_every_rank(synchronized, counts):
    """SyncBatchNorm's docstring promises the same averages on every rank; with each rank passing its own batches
    to precise statistics, each kept its own (moving means 5.4 apart). Synchronized layers go through the batches
    in step (a rank that runs out stops them all: here after the smaller count), so the oracle is one process on
    each step's batches concatenated; unsynchronized ones pool with ``comm=`` every batch of every rank."""
    from threadcomm import run_ranks

    rng = numpy.random.default_rng(3)
    batches = [[rng.standard_normal((4, 5)) * (rank + 1) + rank for _ in range(counts[rank])] for rank in (0, 1)]
    steps = min(counts) if synchronized else max(counts)

    models = [dense_model(), dense_model()]      # built here: the ranks' threads would race on the seeded generator

    def work(comm):
        model = models[comm.rank]
        if synchronized:
            nn.convert_sync(model, comm)
            used = recompute(model, batches[comm.rank])
        else:
            used = recompute(model, batches[comm.rank], comm=comm)
        return used, [model[i].moving_mean.numpy().copy() for i in (1, 5)], [model[i].moving_var.numpy().copy()
                                                                           for i in (1, 5)]

    (used0, means0, vars0), (used1, means1, vars1) = run_ranks(2, work)
    for a, b in zip(means0 + vars0, means1 + vars1):
        numpy.testing.assert_array_equal(a, b)                 # the same on every rank, to the bit
    model = dense_model()
    if synchronized:        # one process, each step's two batches as one
        whole = [numpy.concatenate([batches[0][k], batches[1][k]]) for k in range(steps)]
        recompute(model, whole)
        assert (used0, used1) == (steps, steps)
    else:                   # each rank's batches normalized by themselves: the layers' inputs, pooled
        recompute(model, batches[0] + batches[1])
        assert (used0, used1) == counts
    for i, mean, var in zip((1, 5), means0, vars0):
        numpy.testing.assert_allclose(mean, model[i].moving_mean.numpy(), atol=1e-12)
        numpy.testing.assert_allclose(var, model[i].moving_var.numpy(), atol=1e-12)


def test_a_pytorch_dataloader_is_accepted():
    """Issue 21: PyTorch's DataLoader yields lists [images, labels]; NumPy refused them as an "inhomogeneous
    shape". The docstring says such batches are accepted."""
    torch = pytest.importorskip("torch")
    data = numpy.random.default_rng(0).standard_normal((12, 5))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.tensor(data), torch.zeros(12)),
                                         batch_size=4)
    model, reference = dense_model(), dense_model()
    assert recompute(model, loader) == 3
    recompute(reference, [data[:4], data[4:8], data[8:]])
    for i in (1, 5):
        numpy.testing.assert_array_equal(model[i].moving_var.numpy(), reference[i].moving_var.numpy())


def test_the_pass_puts_back_what_training_mode_changed_and_a_lazy_layer_its_first_statistics():
    model = dense_model()
    model(tinybn.tensor(numpy.ones((3, 5))))     # materialize; then make the counter and averages distinctive
    counter = model[1].num_batches_tracked.numpy().copy()
    with pytest.raises(ValueError):
        recompute(model, [numpy.ones((4, 5)), numpy.ones((4, 6))])       # the second batch does not fit
    assert model[1].num_batches_tracked.numpy() == counter and (model[1].moving_var.numpy() != 0).all()
    lazy = nn.Sequential(nn.Linear(5, 2, dtype=numpy.float64), nn.BatchNorm1d(dtype=numpy.float64))
    with pytest.raises(ValueError):
        recompute(lazy, [numpy.ones((4, 5)) * 3, numpy.ones((4, 6))])
    numpy.testing.assert_array_equal(lazy[1].moving_mean.numpy(), numpy.zeros(2))
    numpy.testing.assert_array_equal(lazy[1].moving_var.numpy(), numpy.ones(2))


# ------------------------------------------------------------------ found by the outside test of issue 21

def test_synchronized_layers_with_the_default_communicator_pool_over_the_ranks_and_go_in_step(monkeypatch):
    """SyncBatchNorm(comm=None) normalizes over the default communicator, but precise statistics asked only the
    layer's own comm: each rank kept its own statistics (5 units apart), and uneven batch counts hung the job."""
    import threading

    from threadcomm import run_ranks
    from tinybn import communicator

    mine = threading.local()                    # each thread rank's default communicator, as init() sets it
    monkeypatch.setattr(communicator, "default", lambda: mine.comm)
    batches = [[numpy.random.default_rng(r).normal(10 * r, size=(4, 3)) for _ in range(1 + r)] for r in (0, 1)]

    def work(comm):
        mine.comm = comm
        model = nn.Sequential(nn.SyncBatchNorm(3, dtype=numpy.float64))
        return recompute(model, batches[comm.rank]), model[0].moving_mean.numpy()

    (used0, mean0), (used1, mean1) = run_ranks(2, work)
    numpy.testing.assert_array_equal(mean0, mean1)
    assert used0 == used1 == 1                                   # in step: the rank with fewer batches stops both
    numpy.testing.assert_allclose(mean0, numpy.concatenate([batches[0][0], batches[1][0]]).mean(axis=0), atol=1e-12)


def test_a_lazy_layer_on_a_rank_without_batches_learns_its_size_from_the_others():
    """A rank whose lazy layer saw no batch raised "has no size yet" before the collective, and the other rank
    waited for ever."""
    from threadcomm import run_ranks

    data = numpy.random.default_rng(0).standard_normal((4, 3, 2, 2))

    def work(comm):
        model = nn.Sequential(nn.BatchNorm2d(dtype=numpy.float64))
        recompute(model, [data] if comm.rank == 0 else [], comm=comm)
        return model[0].moving_var.numpy() if comm.rank == 0 else None

    variance, _ = run_ranks(2, work)
    numpy.testing.assert_allclose(variance, data.var(axis=(0, 2, 3)), atol=1e-12)


def test_a_lazy_layer_keeps_its_counters_at_their_start():
    """A lazy layer's num_batches_tracked was advanced by the pass (batch renorm's warm-up, the 1/k weights of
    momentum=None); a sized layer's was put back."""
    batches = [numpy.arange(32.0).reshape(8, 4)] * 5
    for layer in (nn.BatchRenorm1d(dtype=numpy.float64), nn.BatchRenorm1d(4, dtype=numpy.float64),
                  nn.BatchNorm1d(momentum=None, dtype=numpy.float64)):
        recompute(nn.Sequential(layer), batches)
        assert int(layer.num_batches_tracked.item()) == 0, layer
        numpy.testing.assert_allclose(layer.moving_var.numpy(), batches[0].var(axis=0))


def test_non_finite_values_and_batches_too_small_are_refused_in_one_line_and_change_nothing():
    model = dense_model()
    model(tinybn.tensor(numpy.ones((2, 5))))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    bad = numpy.ones((4, 5))
    bad[1, 2] = numpy.nan
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d.*saw a NaN or an infinity"):
        recompute(model, [numpy.ones((4, 5)), bad])
    with pytest.raises(ValueError, match=r"batch 2 \(\(1, 5\)\) is too small .* Leave it out"):
        recompute(model, [numpy.random.default_rng(0).standard_normal((4, 5)), numpy.ones((1, 5))])
    with pytest.raises(ValueError, match="no batch held an example"):
        recompute(model, [numpy.ones((0, 5))])
    for key, value in model.state_dict().items():
        numpy.testing.assert_array_equal(value, before[key])
