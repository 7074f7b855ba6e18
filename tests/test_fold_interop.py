"""BN folded into the layer before it (equal predictions, the original untouched, clear refusals), and PyTorch
state dicts in and out (equal prediction-mode logits in float64, round trips, the module without PyTorch)."""
from __future__ import annotations

import subprocess
import sys

import numpy
import pytest

import tinybn
from tinybn import interop, nn
from tinybn.app.models import build_lenet, build_model
from tinybn.autograd import Tensor

try:
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (the comparison needs it)")


def images(count=64, seed=0):
    return numpy.random.default_rng(seed).uniform(0, 1, (count, 1, 28, 28))


def trained_a_little(model, dtype):
    """A few training steps, then made-up γ and β, so that every statistic and parameter is far from its start."""
    model.to(dtype=dtype)
    optimizer = tinybn.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        loss = tinybn.functional.cross_entropy(model(Tensor(images(32, step).astype(dtype))),
                                               Tensor(numpy.arange(32) % 10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rng = numpy.random.default_rng(1)
    for module in model.modules():
        if hasattr(module, "gamma"):
            module.gamma.data = (module.gamma.data * rng.uniform(0.5, 2, module.gamma.shape)).astype(dtype)
    return model.eval()


@pytest.mark.parametrize("name", ["lenet-bn", "lenet-bn-concise"])
@pytest.mark.parametrize("dtype, tolerance", [(numpy.float64, 1e-12), (numpy.float32, 2e-6)])
def test_folded_model_predicts_what_the_model_predicts(name, dtype, tolerance):
    model = trained_a_little(build_model(name), dtype)
    before = model.state_dict()
    folded = nn.fold_batch_norm(model)
    x = Tensor(images().astype(dtype))
    expected, got = model(x).data, folded(x).data
    assert got.dtype == dtype
    numpy.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    assert not any(isinstance(m, (nn.BatchNorm, nn.BatchNorm1d)) for m in folded.modules())
    assert len(folded) == len(model) - 4
    after = model.state_dict()                       # the original is unchanged
    assert all(numpy.array_equal(before[k], after[k]) for k in before)


def test_folding_decorrelated_bn_and_batch_renorm_and_a_layer_without_bias():
    dense = nn.Sequential(nn.Linear(5, 4, bias=False), nn.DecorrelatedBatchNorm(4, group_size=3), nn.Sigmoid(),
                          nn.Linear(4, 3), nn.BatchRenorm1d(3), nn.Linear(3, 2)).to(dtype=numpy.float64)
    x = Tensor(numpy.random.default_rng(0).standard_normal((50, 5)))
    for _ in range(3):
        dense(x)
    dense.eval()
    folded = nn.fold_batch_norm(dense)
    numpy.testing.assert_allclose(folded(x).data, dense(x).data, atol=1e-12)
    assert folded[0].bias is not None and dense[0].bias is None


def test_folding_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="1 .* is in training mode"):
        nn.fold_batch_norm(build_model("lenet-bn"))
    with pytest.raises(ValueError, match=r"follows 1 \(Sigmoid"):
        nn.fold_batch_norm(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.BatchNorm1d(3)).eval())
    with pytest.raises(ValueError, match="has no size yet"):
        nn.fold_batch_norm(build_model("lenet-bn-concise").eval())

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

    with pytest.raises(ValueError, match="norm .* not inside a plain Sequential"):
        nn.fold_batch_norm(Custom().eval())
    no_bn = build_model("lenet").eval()                         # nothing to fold: a copy, the same function
    x = Tensor(images(4).astype(numpy.float32))
    numpy.testing.assert_array_equal(nn.fold_batch_norm(no_bn)(x).data, no_bn(x).data)


# ----------------------------------------------------------------------------------------------- PyTorch

def torch_lenet(bn=True):
    def norm(c, two_d):
        return [torch.nn.BatchNorm2d(c) if two_d else torch.nn.BatchNorm1d(c)] if bn else []
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5), *norm(6, True), torch.nn.Sigmoid(), torch.nn.MaxPool2d(2, 2),
        torch.nn.Conv2d(6, 16, 5), *norm(16, True), torch.nn.Sigmoid(), torch.nn.MaxPool2d(2, 2), torch.nn.Flatten(),
        torch.nn.Linear(256, 120), *norm(120, False), torch.nn.Sigmoid(), torch.nn.Linear(120, 84),
        *norm(84, False), torch.nn.Sigmoid(), torch.nn.Linear(84, 10)).double()


def torch_trained(bn=True):
    torch.manual_seed(0)
    model = torch_lenet(bn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.tensor(images(32, step))), torch.arange(32) % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@needs_torch
@pytest.mark.parametrize("name", ["lenet", "lenet-bn", "lenet-bn-concise"])
def test_a_pytorch_model_and_its_tinybn_twin_predict_the_same(name):
    theirs = torch_trained(bn=name != "lenet")
    ours = build_model(name).to(dtype=numpy.float64)
    interop.load_torch_state_dict(ours, theirs.state_dict())
    x = images()
    numpy.testing.assert_allclose(ours.eval()(Tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(), atol=1e-9)
    # and back: tinybn's state into a fresh PyTorch model
    again = torch_lenet(bn=name != "lenet")
    again.load_state_dict(interop.torch_state_dict(ours))
    numpy.testing.assert_allclose(again.eval()(torch.tensor(x)).detach().numpy(), ours(Tensor(x)).data, atol=1e-12)
    for key, value in theirs.state_dict().items():
        numpy.testing.assert_array_equal(again.state_dict()[key].numpy(), value.numpy())


@needs_torch
def test_a_pytorch_module_brings_its_momentum_and_eps():
    theirs = torch_trained()
    theirs[1].momentum, theirs[1].eps = 0.25, 1e-3
    theirs[5].momentum = None                      # PyTorch's cumulative average is tinybn's momentum=None
    ours = build_model("lenet-bn").to(dtype=numpy.float64)
    interop.load_torch_state_dict(ours, theirs)
    assert (ours[1].momentum, ours[1].eps) == (0.75, 1e-3) and ours[5].momentum is None
    assert ours[10].momentum == pytest.approx(0.9)
    x = images(8)
    numpy.testing.assert_allclose(ours.eval()(Tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(), atol=1e-9)


def test_round_trip_and_refusals_without_pytorch():
    model = trained_a_little(build_model("lenet-bn"), numpy.float32)
    state = interop.torch_state_dict(model, as_tensors=False)
    assert "1.running_var" in state and state["1.weight"].shape == (6,) and "1.gamma" not in state
    twin = build_model("lenet-bn")
    interop.load_torch_state_dict(twin, state)
    for key, value in model.state_dict().items():
        numpy.testing.assert_array_equal(twin.state_dict()[key], value)
    before = twin.state_dict()
    with pytest.raises(KeyError, match="match nothing"):
        interop.load_torch_state_dict(twin, {**state, "16.weight": numpy.zeros(3)})
    broken = dict(state)
    broken["0.weight"] = numpy.zeros((6, 1, 3, 3))
    with pytest.raises(ValueError, match="0.weight"):
        interop.load_torch_state_dict(twin, broken)
    assert all(numpy.array_equal(before[k], v) for k, v in twin.state_dict().items())   # nothing changed
    with pytest.raises(KeyError, match="missing"):
        interop.load_torch_state_dict(build_model("lenet-bn"), {k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="no PyTorch counterpart"):
        interop.torch_state_dict(nn.Sequential(nn.BatchRenorm1d(3)), as_tensors=False)


def test_the_chapter_layer_names_load_too():
    model = trained_a_little(build_lenet("scratch"), numpy.float32)
    chapter_style = {k: v for k, v in model.state_dict().items()}       # gamma, beta, moving_* of shape (1, C, 1, 1)
    twin = build_model("lenet-bn-concise")
    interop.load_torch_state_dict(twin, chapter_style)
    x = Tensor(images(4).astype(numpy.float32))
    numpy.testing.assert_allclose(twin.eval()(x).data, model(x).data, atol=1e-6)


def test_interop_imports_without_pytorch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tinybn.interop as i\n"
            "from tinybn.app.models import build_model\n"
            "try:\n    i.torch_state_dict(build_model('lenet'))\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs PyTorch" in out and "as_tensors=False" in out


# ------------------------------------------------------------------ found by an outside test, kept as rows

def small_trained(net):
    x = Tensor(numpy.random.default_rng(0).standard_normal((6, 3)))
    net.to(dtype=numpy.float64)
    net(x), net(x * 2 + 1)
    return net.eval(), x


def test_folding_refuses_shared_layers_subclassed_sequentials_and_two_bns_in_a_row():
    shared = nn.Linear(3, 3)
    net, _ = small_trained(nn.Sequential(shared, nn.BatchNorm1d(3), nn.ReLU(), shared))
    with pytest.raises(ValueError, match="used in more than one place"):
        nn.fold_batch_norm(net)

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    net, _ = small_trained(nn.Sequential(Residual(nn.Linear(3, 3), nn.BatchNorm1d(3)), nn.ReLU()))
    with pytest.raises(ValueError, match="0.1 .* not inside a plain Sequential"):
        nn.fold_batch_norm(net)
    net, _ = small_trained(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="follows another normalization layer, already folded into 0"):
        nn.fold_batch_norm(net)
    net, x = small_trained(nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), nn.ReLU()))
    numpy.testing.assert_allclose(nn.fold_batch_norm(net)(x).data, net(x).data, atol=1e-12)   # nested: fine


@needs_torch
def test_a_torch_module_brings_every_normalizations_eps_and_instance_norms_momentum():
    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4, eps=0.1),
                                 torch.nn.InstanceNorm2d(4, eps=0.2, momentum=0.3, track_running_stats=True),
                                 torch.nn.Flatten(), torch.nn.LayerNorm(4 * 6 * 6, eps=0.05)).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    theirs(x)
    theirs.eval()
    ours = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, track_running_stats=True),
                         nn.Flatten(), nn.LayerNorm(4 * 6 * 6)).to(dtype=numpy.float64)
    interop.load_torch_state_dict(ours, theirs)
    assert (ours[1].eps, ours[2].eps, ours[4].eps) == (0.1, 0.2, 0.05) and ours[2].momentum == pytest.approx(0.7)
    ours.eval()
    ours[2].moving_var.data = theirs[2].running_var.numpy().copy()   # the unbiased/biased note aside
    numpy.testing.assert_allclose(ours(Tensor(x.numpy())).data, theirs(x).detach().numpy(), atol=1e-9)


@needs_torch
def test_interop_corner_cases():
    # the chapter's from-scratch PyTorch layer: moving statistics outside the state dict, no counter
    class ChapterBN(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.rand(1, channels, 1, 1, dtype=torch.float64) + 0.5)
            self.beta = torch.nn.Parameter(torch.randn(1, channels, 1, 1, dtype=torch.float64))
            self.moving_mean = torch.randn(1, channels, 1, 1, dtype=torch.float64)
            self.moving_var = torch.rand(1, channels, 1, 1, dtype=torch.float64) + 0.5

    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3).double(), ChapterBN(2))
    ours = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm(2, num_dims=4)).to(dtype=numpy.float64)
    interop.load_torch_state_dict(ours, theirs)
    numpy.testing.assert_array_equal(ours[1].moving_var.data, theirs[1].moving_var.numpy())
    assert int(ours[1].num_batches_tracked.item()) == 0
    # a layer used twice is listed twice, as PyTorch does, both ways
    shared = torch.nn.Linear(3, 3).double()
    theirs = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    mine = nn.Linear(3, 3)
    ours = nn.Sequential(mine, nn.ReLU(), mine).to(dtype=numpy.float64)
    interop.load_torch_state_dict(ours, theirs.state_dict())
    back = interop.torch_state_dict(ours)
    assert set(back) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    theirs.load_state_dict(back)
    # the counter stays 0-d; bfloat16 loads; messages use PyTorch's names and list every problem
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in bn.state_dict().items()}
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    interop.load_torch_state_dict(target, state)
    assert interop.torch_state_dict(target)["1.num_batches_tracked"].shape == ()
    broken = dict(bn.state_dict())
    del broken["1.running_var"]
    broken["1.running_mean"] = torch.zeros(2, 2)
    broken["9.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as caught:
        interop.load_torch_state_dict(target, broken)
    text = str(caught.value)
    assert "1.running_var" in text and "9.weight" in text and "1.running_mean has shape (2, 2)" in text
    no_affine = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, affine=False))
    with pytest.raises(KeyError, match="affine=False"):
        interop.load_torch_state_dict(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), no_affine.state_dict())


# ------------------------------------------------------------------ issue 21: where folding met other features

def test_fold_refuses_a_weight_tied_between_layers_and_leaves_the_model_unchanged():
    """A Parameter shared by two layers: folding wrote the scaled weight into it, so the other layer changed too
    (24 – 84 % off in float64)."""
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    net, x = small_trained(nn.Sequential(first, nn.BatchNorm1d(3), nn.ReLU(), second))
    state = net.state_dict()
    with pytest.raises(ValueError, match=r"0.weight is a parameter shared with another layer \(a tied weight\)"):
        nn.fold_batch_norm(net)
    for name, value in net.state_dict().items():
        numpy.testing.assert_array_equal(value, state[name], err_msg=name)


def test_fold_keeps_each_modules_mode_so_dropout_switched_off_by_hand_stays_off():
    """A model in training mode whose BN and dropout layers were switched to eval one by one: the rebuilt
    Sequential put dropout back into training mode, and the outputs differed at random."""
    net, x = small_trained(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)))
    net.train()
    net[1].eval(), net[2].eval()
    folded = nn.fold_batch_norm(net)
    assert folded.training and not folded[1].training                 # the dropout layer, now at index 1
    numpy.testing.assert_allclose(folded(x).data, net(x).data, atol=1e-12)


def test_fold_refuses_layers_with_forward_hooks_and_keeps_a_containers_hooks():
    """Forward hooks on a folded BN layer vanished without a word (the output differed by 0.15)."""
    net, x = small_trained(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()))
    handle = net[1].register_forward_hook(lambda module, inputs, output: output * 2)
    with pytest.raises(ValueError, match="1 .* has forward hooks"):
        nn.fold_batch_norm(net)
    handle.remove()
    net[0].register_forward_hook(lambda module, inputs, output: None)
    with pytest.raises(ValueError, match="0 .* has forward hooks"):
        nn.fold_batch_norm(net)
    net, x = small_trained(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()))
    net.register_forward_hook(lambda module, inputs, output: output + 1)     # on the container: same function
    numpy.testing.assert_allclose(nn.fold_batch_norm(net)(x).data, net(x).data, atol=1e-12)


def test_fold_a_model_whose_synchronized_layers_hold_a_communicator():
    """convert_sync_batchnorm(model, comm) and distributed train() return such models; deepcopy failed on the
    communicator's MPI module ("cannot pickle 'module' object")."""
    from tinybn.communicator import LocalCommunicator

    class Connected(LocalCommunicator):
        def __init__(self):
            self.library = sys                         # a module, as an MPI communicator holds one

    net, x = small_trained(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()))
    expected = net(x).data
    comm = Connected()
    nn.SyncBatchNorm.convert_sync_batchnorm(net, comm)
    assert net[1].comm is comm
    folded = nn.fold_batch_norm(net)
    assert len(folded) == 2 and net[1].comm is comm
    numpy.testing.assert_allclose(folded(x).data, expected, atol=1e-12)


def test_fold_asks_the_layer_instance_norm_with_running_statistics_folds_and_group_norm_stays():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                        nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)).to(dtype=numpy.float64)
    x = Tensor(numpy.random.default_rng(0).standard_normal((3, 2, 5, 5)))
    net(x), net(x + 1)
    net.eval()
    folded = nn.fold_batch_norm(net)
    assert [type(layer).__name__ for layer in folded] == ["Conv2d", "Conv2d", "GroupNorm"]
    numpy.testing.assert_allclose(folded(x).data, net(x).data, atol=1e-12)


def test_a_weight_tied_between_two_layers_goes_to_pytorch_under_both_names():
    """Found by the feature matrix: a Parameter shared by two layers was written under the first layer's name
    only, and PyTorch refused the state dict ("Missing key(s): 2.weight"); PyTorch lists every place."""
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    net = nn.Sequential(first, nn.Sigmoid(), second)
    state = interop.torch_state_dict(net, as_tensors=False)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    numpy.testing.assert_array_equal(state["0.weight"], state["2.weight"])
    back = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 3))
    interop.load_torch_state_dict(back, state)
    numpy.testing.assert_array_equal(back[2].weight.numpy(), first.weight.numpy())
    state["2.weight"] = state["2.weight"] + 1                  # a tied tensor cannot hold two values
    with pytest.raises(ValueError, match="name one tinybn tensor"):
        interop.load_torch_state_dict(net, state)


@needs_torch
def test_an_instance_norm_without_running_statistics_takes_any_pytorch_momentum():
    """Found by the outside test of issue 21: PyTorch's momentum=None was refused even where no running statistics
    use it; it is refused only where they do."""
    interop.load_torch_state_dict(nn.Sequential(nn.InstanceNorm2d(3)), torch.nn.Sequential(
        torch.nn.InstanceNorm2d(3, momentum=None)))
    with pytest.raises(ValueError, match="momentum=None"):
        interop.load_torch_state_dict(nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True)), torch.nn.Sequential(
            torch.nn.InstanceNorm2d(3, momentum=None, track_running_stats=True)))
