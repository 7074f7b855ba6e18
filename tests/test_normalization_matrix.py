"""The product of features (issue 21): every normalization kind, and models that mix them, × every tool that acts on
normalization layers × the states users put models in.

Each drawn case is a small float64 model with three normalization slots (two after convolutions, one after a dense
layer), each holding a drawn kind or nothing, then put in drawn states: training or prediction mode layer by
layer, a weight tied between two convolutions, a forward hook on one layer, lazy layers that have not seen an
input, a model rebuilt from another's state dict. Each tool must give the right answer, against an oracle that
does not share its code, or a one-line refusal that names the layer and says why, and then only where a refusal
is the right answer:

* fold: the folded model predicts what the model predicts, and the model is unchanged;
* PyTorch interop: a round trip through PyTorch's names changes nothing, and a PyTorch twin built layer by layer
  predicts the same (float64, prediction mode);
* precise statistics: NumPy's mean and variance (or covariance and whitening) of each layer's inputs, captured by
  a hook during a plain training-mode pass of a copy;
* SyncBN conversion: the converted model with one rank is the model, output, gradients and buffers;
* 2-rank training with the thread communicator: one step on shards equals one process on the whole batch;
* checkpoint and resume: a state dict loaded into a fresh model gives the same outputs, and the same next step;
* the BN-statistics recorder: its batch statistics are those of each watched layer's input.

``TINYBN_EXPLORE=20 python -m pytest tests/test_normalization_matrix.py`` runs twenty times as many cases.
"""
from __future__ import annotations

import copy

import numpy
import pytest
from hypothesis import given, strategies as st

import tinybn
from tinybn import interop, nn
from tinybn.autograd import Tensor, no_grad
from tinybn.communicator import LocalCommunicator
from tinybn.functional.whitening import whitening_matrix

from props import budget
from threadcomm import run_ranks

try:
    import torch
except ImportError:
    torch = None

FOUR_D = {  # after a convolution with 4 output channels, on 4 x 4 images
    "BatchNorm (chapter)": lambda: nn.BatchNorm(4, num_dims=4),
    "BatchNorm2d": lambda: nn.BatchNorm2d(4),
    "BatchNorm2d (lazy)": lambda: nn.BatchNorm2d(),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(4, comm=LocalCommunicator()),
    "BatchRenorm2d": lambda: nn.BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=1),
    "LayerNorm": lambda: nn.LayerNorm((4, 4, 4)),
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(4),
    "InstanceNorm2d (tracked, affine)": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "DecorrelatedBatchNorm": lambda: nn.DecorrelatedBatchNorm(4, group_size=2, eps=1e-2),
    "none": None,
}
TWO_D = {  # after a dense layer with 6 outputs
    "BatchNorm (chapter)": lambda: nn.BatchNorm(6, num_dims=2),
    "BatchNorm1d": lambda: nn.BatchNorm1d(6, momentum=None),
    "BatchNorm1d (lazy)": lambda: nn.BatchNorm1d(),
    "BatchRenorm1d": lambda: nn.BatchRenorm1d(6, r_max=1.5, d_max=0.5, warmup_steps=0),
    "LayerNorm": lambda: nn.LayerNorm(6),
    "DecorrelatedBatchNorm": lambda: nn.DecorrelatedBatchNorm(6, group_size=4, eps=1e-2),
    "none": None,
}
TOOLS = ("fold", "interop", "precise", "sync", "ranks", "checkpoint", "recorder")


def build(spec):
    """The model of a drawn case, float64, with its weight tie; returns it."""
    first, second, dense = spec["kinds"]
    layers = [nn.Conv2d(2, 4, 3, padding=1)] + ([FOUR_D[first]()] if FOUR_D[first] else []) + [nn.Sigmoid()]
    pointwise = nn.Conv2d(4, 4, 1)
    layers += [pointwise] + ([FOUR_D[second]()] if FOUR_D[second] else []) + [nn.Sigmoid()]
    if spec["tied"]:                          # one more convolution, sharing the previous one's weight
        tied = nn.Conv2d(4, 4, 1)
        layers += [tied, nn.Sigmoid()]
    layers += [nn.Flatten(), nn.Linear(64, 6)] + ([TWO_D[dense]()] if TWO_D[dense] else []) + [nn.Sigmoid(),
                                                                                                nn.Linear(6, 3)]
    tinybn.manual_seed(spec["seed"])
    model = nn.Sequential(*layers).to(dtype=numpy.float64)
    if spec["tied"]:
        tied.weight = pointwise.weight
    return model


def step(model, x, dy):
    """One training-style forward and backward (in each layer's own mode); the output and every gradient."""
    model.zero_grad()
    y = model(Tensor(x))
    (y * Tensor(dy)).sum().backward()
    return y.data, [p.grad.copy() if p.grad is not None else None for p in model.parameters()]


def prepared(spec):
    """The model in the drawn states: warmed up by some steps (lazy layers then have sizes), maybe rebuilt from its
    state dict, its layers in the drawn modes, a hook on the drawn layer. Returns (model, x, dy)."""
    rng = numpy.random.default_rng(spec["seed"])
    x = rng.standard_normal((spec["n"], 2, 4, 4)) * 2 + 1
    dy = rng.standard_normal((spec["n"], 3))
    model = build(spec)
    optimizer = tinybn.optim.SGD(model.parameters(), lr=0.1)
    for k in range(spec["warm"]):
        step(model, x * (k + 1), dy)
        optimizer.step()
    if spec["reloaded"] and spec["warm"]:
        fresh = build(spec)
        fresh.load_state_dict(model.state_dict())
        model = fresh
    norms = [layer for _, layer in nn.normalization_layers(model)]
    for layer, training in zip(norms, spec["modes"]):
        layer.train(training)
    if spec["hook"] is not None:
        target = list(model)[spec["hook"] % len(model)]
        target.register_forward_hook(lambda module, inputs, output: output * 1.5)
    return model, x, dy


def one_line_naming_a_layer(error, model):
    message = str(error)
    names = [name for name, _ in model.named_modules() if name] + [type(m).__name__ for m in model.modules()]
    assert "\n" not in message and any(name in message for name in names), message


def snapshot(model) -> dict:
    """Copies of every parameter and buffer that has a size."""
    return {name: t.data.copy() for name, t in (*model.named_parameters(), *model.named_buffers())
            if nn.is_materialized(t)}


def lazy_unsized(model):
    return not all(nn.is_materialized(t) for t in (*model.parameters(), *model.buffers()))


# ------------------------------------------------------------------------------------------------ the cells

def cell_fold(spec, model, x, dy):
    before = snapshot(model)
    layers = list(model)
    foldable = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Normalization) and layer.running_statistics]
    hooked = spec["hook"] % len(layers) if spec["hook"] is not None else None
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
    tied = [i for i in convs if sum(layers[j].weight is layers[i].weight for j in convs) > 1]
    refusals = []
    if lazy_unsized(model):
        refusals.append("has no size yet")
    if any(layers[i].training for i in foldable):
        refusals.append("training mode")
    if any(i - 1 in tied for i in foldable):
        refusals.append("tied weight")
    if hooked is not None and any(hooked in (i, i - 1) for i in foldable):
        refusals.append("forward hooks")
    try:
        folded = nn.fold_batch_norm(model)
    except ValueError as error:
        assert refusals and any(words in str(error) for words in refusals), (refusals, error)
        one_line_naming_a_layer(error, model)
        return
    assert not refusals, f"folded a model it should have refused ({refusals})"
    with no_grad():
        expected = copy.deepcopy(model)(Tensor(x)).data
        numpy.testing.assert_allclose(folded(Tensor(x)).data, expected, rtol=1e-9, atol=1e-9)
    assert snapshot(model).keys() == before.keys()
    for name, value in snapshot(model).items():
        numpy.testing.assert_array_equal(value, before[name], err_msg=f"fold changed {name} of the model")


def torch_twin(model):
    """The same model in PyTorch, layer by layer (None where a layer has no PyTorch counterpart, or without
    PyTorch)."""
    if torch is None:
        return None
    layers, previous = [], None
    for layer in model:
        after_conv, previous = isinstance(previous, nn.Conv2d), layer
        if isinstance(layer, nn.Conv2d):
            layers.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                          padding=layer.padding))
        elif isinstance(layer, nn.Linear):
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features))
        elif isinstance(layer, (nn.Sigmoid, nn.Flatten)):
            layers.append(torch.nn.Sigmoid() if isinstance(layer, nn.Sigmoid) else torch.nn.Flatten())
        elif isinstance(layer, nn.LayerNorm):
            layers.append(torch.nn.LayerNorm(layer.normalized_shape, eps=layer.eps))
        elif isinstance(layer, nn.GroupNorm):
            layers.append(torch.nn.GroupNorm(layer.num_groups, layer.num_channels, eps=layer.eps))
        elif isinstance(layer, nn.InstanceNorm2d):
            layers.append(torch.nn.InstanceNorm2d(layer.num_features, eps=layer.eps, affine=layer.affine,
                                                  track_running_stats=layer.track_running_stats))
        elif isinstance(layer, nn.Normalization) and layer.torch_names is not None:     # batch norm of any kind
            kind = torch.nn.BatchNorm2d if after_conv else torch.nn.BatchNorm1d
            layers.append(kind(layer.num_features, eps=layer.eps))
        else:
            return None
    return torch.nn.Sequential(*layers).double()


def cell_interop(spec, model, x, dy):
    has_no_twin = [layer for _, layer in nn.normalization_layers(model) if layer.torch_names is None]
    try:
        state = interop.torch_state_dict(model, as_tensors=False)
    except (ValueError, RuntimeError) as error:
        reasons = ["no PyTorch counterpart"] * bool(has_no_twin) + ["no size yet"] * lazy_unsized(model)
        assert any(reason in str(error) for reason in reasons), (reasons, error)
        one_line_naming_a_layer(error, model)
        return
    assert not has_no_twin and not lazy_unsized(model)
    fresh = build(spec)
    fresh(Tensor(x))                                   # lazy layers take their sizes
    interop.load_torch_state_dict(fresh, state)
    for name, value in model.state_dict().items():
        numpy.testing.assert_array_equal(fresh.state_dict()[name], value, err_msg=name)
    twin = torch_twin(model)
    if torch is not None and twin is not None and spec["hook"] is None:
        twin.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
        with torch.no_grad():
            theirs = twin.eval()(torch.from_numpy(x)).numpy()
        with no_grad():
            ours = copy.deepcopy(model).eval()(Tensor(x)).data
        numpy.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def cell_precise(spec, model, x, dy):
    batches = [x, x[: max(2, len(x) // 2)] * 3 - 1, x[::-1] * 0.5]
    pooling = [layer for _, layer in nn.normalization_layers(model) if layer.pools_statistics]
    oracle = copy.deepcopy(model)
    seen = {}
    for index, layer in enumerate(oracle):
        if isinstance(layer, nn.Normalization) and layer.pools_statistics:
            layer.register_forward_hook(lambda m, inputs, out, i=index: seen.setdefault(i, []).append(inputs[0].data))
    oracle.eval()
    for _, layer in nn.normalization_layers(oracle):
        if layer.pools_statistics:
            layer.train()
    with no_grad():
        for batch in batches:
            oracle(Tensor(batch))
    modes = [module.training for module in model.modules()]
    try:
        nn.recompute_batch_norm_statistics(model, batches)
    except ValueError as error:
        assert not pooling and "no normalization layer whose statistics could be recomputed" in str(error)
        return
    assert pooling
    assert [module.training for module in model.modules()] == modes
    for index, values in seen.items():
        layer, inputs = list(model)[index], numpy.concatenate(values)
        if isinstance(layer, nn.DecorrelatedBatchNorm):
            X = inputs.transpose(1, 0, 2, 3).reshape(inputs.shape[1], -1) if inputs.ndim == 4 else inputs.T
            numpy.testing.assert_allclose(layer.moving_mean.numpy(), X.mean(axis=1), atol=1e-10)
            expected = whitening_matrix(numpy.cov(X, bias=True), layer.group_size, layer.iterations, layer.eps)
            numpy.testing.assert_allclose(layer.moving_whitening.numpy(), expected, atol=1e-8)
        else:
            axes = (0,) if inputs.ndim == 2 else (0, 2, 3)
            numpy.testing.assert_allclose(layer.moving_mean.numpy().reshape(-1), inputs.mean(axis=axes), atol=1e-10)
            numpy.testing.assert_allclose(layer.moving_var.numpy().reshape(-1), inputs.var(axis=axes), atol=1e-10)


def cell_sync(spec, model, x, dy):
    reference = copy.deepcopy(model)
    nn.convert_sync(model, LocalCommunicator())
    for _, layer in nn.normalization_layers(model):
        assert not layer.batch_dependent or layer.comm is not None
    assert_same_step(model, reference, x, dy)


def assert_same_step(model, reference, x, dy):
    y, grads = step(model, x, dy)
    y_ref, grads_ref = step(reference, x, dy)
    numpy.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            numpy.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-9)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers()):
        numpy.testing.assert_allclose(b.data, b_ref.data, rtol=1e-10, atol=1e-10, err_msg=name)


def cell_ranks(spec, model, x, dy):
    cut = 1 + spec["seed"] % (len(x) - 1)

    def work(comm):
        mine = nn.convert_sync(copy.deepcopy(model), comm)
        rows = slice(0, cut) if comm.rank == 0 else slice(cut, None)
        y, grads = step(mine, x[rows], dy[rows])
        summed = [None if g is None else comm.all_reduce(g) for g in grads]
        return y, summed, {name: b.data for name, b in mine.named_buffers()}

    (y0, grads, buffers0), (y1, _, buffers1) = run_ranks(2, work)
    y_ref, grads_ref = step(model, x, dy)
    numpy.testing.assert_allclose(numpy.concatenate([y0, y1]), y_ref, rtol=1e-9, atol=1e-9)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            numpy.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-8)
    for name, b in model.named_buffers():
        numpy.testing.assert_allclose(buffers0[name], b.data, rtol=1e-9, atol=1e-9, err_msg=name)
        numpy.testing.assert_array_equal(buffers0[name], buffers1[name], err_msg=name)


def cell_checkpoint(spec, model, x, dy):
    try:
        state = model.state_dict()
    except RuntimeError as error:
        assert lazy_unsized(model) and "no size yet" in str(error)
        return
    fresh = build(spec)
    fresh.load_state_dict(state)
    for (_, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        object.__setattr__(b, "training", a.training)
        if a.__dict__.get("_forward_hooks"):
            object.__setattr__(b, "_forward_hooks", a._forward_hooks)
    assert_same_step(fresh, model, x, dy)


def cell_recorder(spec, model, x, dy):
    from tinybn.app.bnstats import BNStatsRecorder

    watched = [(index, layer) for index, layer in enumerate(model)
               if isinstance(layer, nn.Normalization) and layer.running_statistics]
    inputs = {}
    for index, layer in watched:
        layer.register_forward_hook(lambda m, i, o, k=index: inputs.setdefault(k, i[0].data))
    recorder = BNStatsRecorder(model, channels=2)
    step(model, x, dy)
    for index, layer in watched:
        record = recorder.layers[str(index)]
        if not layer.training:
            assert record["batch_mean"] == []
            continue
        values = inputs[index][:, :2]
        axes = (0,) if values.ndim == 2 else (0, 2, 3)
        numpy.testing.assert_allclose(record["batch_mean"][0], values.mean(axis=axes), atol=1e-12)
        numpy.testing.assert_allclose(record["batch_var"][0], values.var(axis=axes), atol=1e-12)
    recorder.close()


CELLS = {"fold": cell_fold, "interop": cell_interop, "precise": cell_precise, "sync": cell_sync, "ranks": cell_ranks,
         "checkpoint": cell_checkpoint, "recorder": cell_recorder}


@st.composite
def cases(draw):
    kinds = (draw(st.sampled_from(sorted(FOUR_D))), draw(st.sampled_from(sorted(FOUR_D))),
             draw(st.sampled_from(sorted(TWO_D))))
    count = sum(1 for k, table in zip(kinds, (FOUR_D, FOUR_D, TWO_D)) if table[k])
    return {"kinds": kinds, "seed": draw(st.integers(0, 2**31)), "n": draw(st.integers(2, 5)),
            "warm": draw(st.integers(0, 2)), "reloaded": draw(st.booleans()), "tied": draw(st.booleans()),
            "modes": draw(st.lists(st.booleans(), min_size=count, max_size=count)),
            "hook": draw(st.none() | st.integers(0, 20))}


@pytest.mark.parametrize("tool", TOOLS)
@budget(12)
@given(spec=cases())
def test_every_tool_on_every_normalization_in_every_state(tool, spec):
    model, x, dy = prepared(spec)
    if lazy_unsized(model) and tool in ("ranks", "sync", "recorder"):
        model(Tensor(x[:2]))             # these tools run the model first; a lazy layer takes its size there too
    CELLS[tool](spec, model, x, dy)


@pytest.mark.parametrize("kinds", [(sorted(FOUR_D)[i % len(FOUR_D)], "none", sorted(TWO_D)[i % len(TWO_D)])
                                   for i in range(len(FOUR_D))])
@pytest.mark.parametrize("tool", TOOLS)
def test_each_kind_reaches_each_tool(tool, kinds):
    """Every kind of normalization meets every tool at least once, whatever Hypothesis draws."""
    spec = {"kinds": kinds, "seed": 1, "n": 4, "warm": 1, "reloaded": False, "tied": False, "hook": None,
            "modes": [False] * 3}
    model, x, dy = prepared(spec)
    CELLS[tool](spec, model, x, dy)
