"""The kernel switch (tinybn.kernels), and every installed kernel family against the readable reference.

The switch: ``import tinybn`` runs the reference, ``use``/``using``/``TINYBN_KERNELS`` choose a family for the
process or a thread, and the command line says which runs. Then one table of cases a family's kernels accept.
For each: the kernel is really the one chosen, it agrees with the reference on outputs and gradients (float64
tightly, float32 to rounding), and its own backward passes a numerical gradient check. Then: the cases that must
fall back to the reference, and whole training runs, each family against the reference, on 1 and 2 threads.
"""
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy
import pytest

import tinybn
from tinybn import nn
from tinybn import kernels, ops
from tinybn import functional as F
from tinybn.app.models import build_model
from tinybn.optim import SGD

from conftest import Samples
from test_data import needs_data

rng = numpy.random.default_rng(9)

FAMILIES = kernels.available()[1:]
needs_a_family = pytest.mark.skipif(not FAMILIES, reason="no kernel family is installed (pip install -e '.[numba]')")
samples = Samples(2024)
randn, positive, distinct = samples.randn, samples.positive, samples.distinct


def channel_major(array):
    """The same NCHW values, stored (C, N, H, W) in memory."""
    return numpy.ascontiguousarray(array.swapaxes(0, 1)).swapaxes(0, 1)


def batch_last(array):
    """The same NCHW values, stored (C, H, W, N) in memory, as the fast paths produce them."""
    return numpy.ascontiguousarray(array.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def with_ties(shape):
    """Pooling windows whose maximum occurs two, three or four times."""
    x = samples.rng.integers(0, 3, shape).astype(float)
    x[0, 0, :2, :2] = 2.0
    return x


def bn(training):
    def call(x, gamma, beta, moving_mean, moving_var):
        return F.batch_norm(x, gamma, beta, moving_mean, moving_var, training=training)
    return call


@dataclass
class Case:
    name: str
    op: str              # name of the reference forward in tinybn.functional
    call: Callable
    args: list           # (array, requires_grad) pairs
    gradcheck: bool = True

    def __str__(self):
        return self.name


CASES = [
    Case("conv2d LeNet-1 k5", "conv2d", lambda x, w, b: F.conv2d(x, w, b),
         [(randn(3, 1, 9, 8), True), (randn(4, 1, 5, 5), True), (randn(4), True)]),
    Case("conv2d k3x2 p(2,1) no bias", "conv2d", lambda x, w: F.conv2d(x, w, padding=(2, 1)),
         [(randn(2, 3, 5, 6), True), (randn(4, 3, 3, 2), True)]),
    Case("conv2d k3 p1 channel-major input", "conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=1),
         [(channel_major(randn(2, 3, 4, 5)), True), (randn(2, 3, 3, 3), True), (randn(2), True)]),
    Case("conv2d k3 no padding batch-last input", "conv2d", lambda x, w, b: F.conv2d(x, w, b),
         [(batch_last(randn(3, 2, 5, 6)), True), (randn(2, 2, 3, 3), True), (randn(2), True)]),
    Case("conv2d data input (no dx)", "conv2d", lambda x, w, b: F.conv2d(x, w, b),
         [(randn(2, 2, 6, 6), False), (randn(3, 2, 3, 3), True), (randn(3), True)]),
    Case("conv2d 1x1", "conv2d", lambda x, w: F.conv2d(x, w),
         [(randn(2, 3, 3, 4), True), (randn(5, 3, 1, 1), True)]),
    Case("conv2d k2x7 p(0,3), wider than five columns, 3 out channels", "conv2d",
         lambda x, w, b: F.conv2d(x, w, b, padding=(0, 3)),
         [(randn(2, 2, 4, 9), True), (randn(3, 2, 2, 7), True), (randn(3), True)]),
    Case("max_pool2d k2", "max_pool2d", lambda x: F.max_pool2d(x, 2), [(distinct(2, 3, 6, 4), True)]),
    Case("max_pool2d k(2,3) s(2,3) channel-major", "max_pool2d", lambda x: F.max_pool2d(x, (2, 3), (2, 3)),
         [(channel_major(distinct(2, 2, 4, 6)), True)]),
    Case("max_pool2d k2 batch-last", "max_pool2d", lambda x: F.max_pool2d(x, 2), [(batch_last(distinct(3, 2, 4, 4)), True)]),
    Case("max_pool2d k2 ties", "max_pool2d", lambda x: F.max_pool2d(x, 2), [(with_ties((2, 2, 4, 4)), True)],
         gradcheck=False),  # a tie has no derivative; the tie rule itself is compared with the reference
    Case("batch_norm 4-D train, (C,)", "batch_norm", bn(True),
         [(randn(3, 2, 3, 4) * 2 + 1, True), (positive(2), True), (randn(2), True), (randn(2), False),
          (positive(2), False)]),
    Case("batch_norm 4-D train, (1,C,1,1), channel-major", "batch_norm", bn(True),
         [(channel_major(randn(2, 3, 2, 3)), True), (positive(1, 3, 1, 1), True), (randn(1, 3, 1, 1), True),
          (randn(1, 3, 1, 1), False), (positive(1, 3, 1, 1), False)]),
    Case("batch_norm 4-D eval", "batch_norm", bn(False),
         [(randn(2, 3, 2, 2), True), (positive(3), True), (randn(3), True), (randn(3), False), (positive(3), False)]),
    Case("conv2d strided-view input", "conv2d", lambda x, w: F.conv2d(x[:, :, 1:, ::2], w, padding=1),
         [(randn(2, 2, 7, 12), True), (randn(3, 2, 3, 3), True)]),
    Case("max_pool2d strided-view input", "max_pool2d", lambda x: F.max_pool2d(x[:, ::2, 1:], 2),
         [(distinct(2, 4, 5, 4), True)]),
    Case("batch_norm strided-view input", "batch_norm", lambda x, g, b, m, v: bn(True)(x[:, :, ::2], g, b, m, v),
         [(randn(3, 2, 6, 3), True), (positive(2), True), (randn(2), True), (randn(2), False), (positive(2), False)]),
    Case("sigmoid", "sigmoid", F.sigmoid, [(randn(3, 4, 2) * 4, True)]),
    Case("sigmoid channel-major", "sigmoid", F.sigmoid, [(channel_major(randn(2, 3, 2, 2)), True)]),
    Case("sigmoid batch-last", "sigmoid", F.sigmoid, [(batch_last(randn(2, 3, 2, 2)), True)]),
    Case("linear", "linear", F.linear, [(randn(5, 4), True), (randn(3, 4), True), (randn(3), True)]),
    Case("linear transposed input, no bias", "linear", F.linear, [(randn(4, 6).T, True), (randn(2, 4), True)]),
    Case("linear data input (no dx)", "linear", F.linear, [(randn(5, 4), False), (randn(3, 4), True)]),
    Case("linear batch of 1", "linear", F.linear, [(randn(1, 4), True), (randn(3, 4), True), (randn(3), True)]),
    Case("batch_norm 2-D train", "batch_norm", bn(True),
         [(randn(5, 3) * 3 + 2, True), (positive(3), True), (randn(3), True), (randn(3), False), (positive(3), False)]),
    Case("batch_norm 2-D eval, batch of 1, (1,C)", "batch_norm", bn(False),
         [(randn(1, 3), True), (positive(1, 3), True), (randn(1, 3), True), (randn(1, 3), False),
          (positive(1, 3), False)]),
    Case("batch_norm 4-D train, one channel, batch of 1", "batch_norm", bn(True),
         [(randn(1, 1, 3, 3), True), (positive(1), True), (randn(1), True), (randn(1), False), (positive(1), False)]),
    Case("conv2d batch of 1, one channel", "conv2d", lambda x, w, b: F.conv2d(x, w, b),
         [(randn(1, 1, 6, 5), True), (randn(1, 1, 3, 3), True), (randn(1), True)]),
    Case("flatten batch-last", "flatten", F.flatten, [(batch_last(randn(3, 2, 2, 3)), True)]),
]


def tensors(case, dtype):
    """The case's arrays in ``dtype``, keeping their memory layout (tinybn.tensor would copy to C order)."""
    return [tinybn.Tensor(a.astype(dtype, order="K") if a.dtype.kind == "f" else a, requires_grad=needs)
            for a, needs in case.args]


def under(family, call):
    def run(*inputs):
        with kernels.using(family):
            return call(*inputs)
    return run


def ran(call, *args):
    """The (op, label) of every forward that ran during ``call(*args)``."""
    with ops.observe(ops.Recorder()) as recorder:
        call(*args)
    return [(implementation.op, implementation.label) for implementation, phase in recorder.calls if phase == "forward"]


# ------------------------------------------------------------------------------------------------ the switch


def test_import_tinybn_runs_the_reference_and_the_environment_chooses():
    """What you read is what runs unless you ask: a fresh process runs the reference; TINYBN_KERNELS asks."""
    code = ("import numpy, tinybn; t = tinybn.tensor(numpy.ones((2, 3)), requires_grad=True); "
            "print(tinybn.kernels.active(), tinybn.ops.choose(tinybn.ops.get('sigmoid'), [numpy.ones(2)], {}).label)")
    env = {k: v for k, v in os.environ.items() if k != "TINYBN_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["reference", "reference"]
    for family in FAMILIES:
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, TINYBN_KERNELS="fastest"),
                             capture_output=True, text=True, check=True).stdout
        assert out.split() == [kernels.available()[-1]] * 2
    bad = subprocess.run([sys.executable, "-c", "import tinybn"], env=dict(env, TINYBN_KERNELS="cuda"),
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "TINYBN_KERNELS='cuda': no kernel family 'cuda'" in bad.stderr


def test_use_using_and_active():
    assert kernels.active() == "reference" and kernels.available()[0] == "reference"
    assert kernels.resolve("fastest") == kernels.available()[-1]
    with pytest.raises(kernels.KernelsUnavailableError, match="no kernel family 'fast'"):
        kernels.use("fast")
    for family in FAMILIES:
        with kernels.using(family):
            assert kernels.active() == family
            assert ops.choose(ops.get("sigmoid"), [randn(3)], {}).label == family
            with kernels.using("reference"):
                assert ops.choose(ops.get("sigmoid"), [randn(3)], {}).label == "reference"
            assert kernels.active() == family
        assert kernels.active() == "reference"
        try:
            assert kernels.use(family) == family and kernels.active() == family
        finally:
            kernels.use("reference")


def test_a_thread_inside_using_keeps_its_family_while_another_changes_the_process():
    import threading

    if not FAMILIES:
        pytest.skip("needs a kernel family")
    inside, go_on, seen = threading.Event(), threading.Event(), []

    def worker():
        with kernels.using("reference"):
            inside.set()
            go_on.wait(10)
            seen.append(kernels.active())
        seen.append(kernels.active())

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(10)
    try:
        kernels.use(FAMILIES[0])
        go_on.set()
        thread.join(10)
    finally:
        kernels.use("reference")
    assert seen == ["reference", FAMILIES[0]]


def test_a_missing_family_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: ["reference"])
    with pytest.raises(kernels.KernelsUnavailableError, match=r"pip install -e '\.\[numba\]'"):
        kernels.use("numba")
    assert kernels.resolve("fastest") == "reference"
    assert "numba is not installed" in kernels.describe("reference")


def test_describe_names_the_family_and_its_ops():
    assert kernels.describe("reference").startswith("kernels: the readable reference for every op")
    for family in FAMILIES:
        kernels.covered(family)                   # loads nothing by itself:
        with kernels.using(family):
            line = kernels.describe()
        assert line.startswith(f"kernels: {family} for ") and "conv2d" in line and "thread(s)" in line


@needs_data
@pytest.mark.parametrize("choice", ["fastest", "reference"])
def test_the_command_line_says_which_kernels_run_in_its_first_line(tmp_path, choice):
    out = subprocess.run([sys.executable, "-m", "tinybn", "train", "--epochs", "1", "--train-subset", "256",
                          "--no-progress", "--no-plot", "--precise-bn", "0", "--kernels", choice, "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = kernels.describe(kernels.resolve(choice))
    assert out.stdout.splitlines()[0] == expected and out.stderr == ""


def test_gradcheck_says_which_implementation_it_checked():
    x = tinybn.tensor(randn(2, 3, 4, 4), requires_grad=True)
    assert tinybn.gradcheck(F.sigmoid, [x])["checked"] == ["sigmoid [reference]"]
    for family in FAMILIES:
        with kernels.using(family):
            assert tinybn.gradcheck(F.sigmoid, [x])["checked"] == [f"sigmoid [{family}]"]


# ------------------------------------------------------------------------------------------------ the kernels


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_kernel_is_chosen(case, family):
    with kernels.using(family):
        assert (case.op, family) in ran(case.call, *tensors(case, numpy.float32))


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype, atol, rtol", [(numpy.float64, 1e-12, 1e-12), (numpy.float32, 1e-5, 1e-4)])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_kernel_equals_the_reference(case, dtype, atol, rtol, threads, family, monkeypatch):
    monkeypatch.setattr(kernels, "_threads", threads)
    tinybn.assert_same(under(family, case.call), case.call, tensors(case, dtype), atol=atol, rtol=rtol)


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", [c for c in CASES if c.gradcheck], ids=str)
def test_the_kernels_backward_passes_gradcheck(case, family):
    with kernels.using(family):
        report = tinybn.gradcheck(case.call, tensors(case, numpy.float64))
    assert report["ok"] and all(f"[{family}]" in name for name in report["checked"] if name.startswith(case.op)), report


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kernels_outputs_are_batch_last_and_the_next_kernel_takes_them_without_a_copy(family):
    x = randn(2, 3, 8, 8)
    with kernels.using(family):
        outputs = [F.conv2d(x, randn(4, 3, 3, 3)), F.max_pool2d(x, 2),
                   F.batch_norm(x, positive(3), randn(3), randn(3), positive(3), training=True)[0]]
        for out in outputs:
            assert out.data.transpose(1, 2, 3, 0).flags.c_contiguous
        assert F.sigmoid(outputs[0]).data.strides == outputs[0].data.strides
        flat = F.flatten(outputs[0])
        assert numpy.shares_memory(flat.data, outputs[0].data)


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
def test_the_sigmoid_kernel_saturates_without_warnings(family):
    x = numpy.array([-1e4, -100.0, -88.8, -20.0, 0.0, 20.0, 100.0, 1e4], numpy.float32)
    with warnings.catch_warnings(), kernels.using(family):
        warnings.simplefilter("error")
        y = F.sigmoid(x).data
    expected = F.sigmoid(x).data
    assert numpy.all(numpy.isfinite(y))
    numpy.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-37)


FALLBACKS = [
    ("conv2d stride 2", lambda: F.conv2d(randn(1, 2, 6, 6), randn(3, 2, 3, 3), stride=2), "conv2d"),
    ("conv2d mixed dtypes", lambda: F.conv2d(randn(1, 2, 6, 6).astype(numpy.float32), randn(3, 2, 3, 3)), "conv2d"),
    ("max_pool2d overlapping", lambda: F.max_pool2d(randn(1, 2, 6, 6), 3, 2), "max_pool2d"),
    ("max_pool2d padded", lambda: F.max_pool2d(randn(1, 2, 6, 6), 2, 2, 1), "max_pool2d"),
    ("max_pool2d ragged", lambda: F.max_pool2d(randn(1, 2, 5, 6), 2), "max_pool2d"),
    ("batch_norm float16", lambda: F.batch_norm(randn(4, 3).astype(numpy.float16), positive(3).astype(numpy.float16),
                                                randn(3).astype(numpy.float16), randn(3).astype(numpy.float16),
                                                positive(3).astype(numpy.float16), training=True), "batch_norm"),
    ("linear with leading axes", lambda: F.linear(randn(2, 3, 4), randn(5, 4)), "linear"),
    ("flatten of a C-order input", lambda: F.flatten(randn(2, 3, 4)), "flatten"),
    ("sigmoid of integers", lambda: F.sigmoid(numpy.arange(3)), "sigmoid"),
    ("conv2d channel mismatch", lambda: _raises(lambda: F.conv2d(randn(1, 2, 6, 6), randn(3, 4, 3, 3))), "conv2d"),
]


def _raises(call):
    """Malformed input goes to the reference, which raises its own error."""
    with pytest.raises(ValueError):
        call()


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, run, op", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_unsupported_cases_run_the_reference(name, run, op, family):
    with kernels.using(family):
        labels = [label for ran_op, label in ran(run) if ran_op == op]
    if name == "conv2d channel mismatch":       # refused by tinybn.functional before any implementation runs
        assert labels == []
    else:
        assert labels and set(labels) == {"reference"}, labels


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
def test_other_array_modules_run_the_reference(family):
    """CuPy (here: the strict stand-in) never meets the NumPy kernels."""
    x_data, w_data = randn(2, 1, 6, 6), randn(2, 1, 3, 3)
    results = {}
    for device in ("strict", "cpu"):  # the stand-in raises if a NumPy function meets its arrays
        with kernels.using(family):
            x = tinybn.tensor(x_data, device=device, requires_grad=True)
            w = tinybn.tensor(w_data, device=device, requires_grad=True)
            y = F.max_pool2d(F.sigmoid(F.conv2d(x, w)), 2)
            y.sum().backward()
        results[device] = tinybn.backend.to_numpy(y.data), tinybn.backend.to_numpy(x.grad)
    for strict_value, numpy_value in zip(results["strict"], results["cpu"]):
        numpy.testing.assert_allclose(strict_value, numpy_value, rtol=1e-12)


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("model", ["lenet-bn", "lenet-bn-concise", "lenet"])
def test_training_under_each_family_follows_the_reference_trajectory(model, threads, family, monkeypatch):
    """Five SGD steps of a whole model in float64, then prediction: the same losses, weights, moving averages and
    scores under each kernel family as under the reference, on 1 and 2 threads."""
    monkeypatch.setattr(kernels, "_threads", threads)
    images = numpy.random.default_rng(0).random((16, 1, 28, 28)).astype(numpy.float64)
    labels = numpy.arange(16) % 10

    def train(choice):
        tinybn.manual_seed(3)
        net = build_model(model).to(dtype=numpy.float64)
        optimizer = SGD(net.parameters(), lr=0.5)
        losses = []
        with kernels.using(choice):
            for _ in range(5):
                loss = F.cross_entropy(net(tinybn.tensor(images)), tinybn.tensor(labels))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.item()))
            net.eval()
            with tinybn.no_grad():
                scores = net(tinybn.tensor(images)).data
        return losses, net.state_dict(), scores

    losses, state, scores = train(family)
    ref_losses, ref_state, ref_scores = train("reference")
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    numpy.testing.assert_allclose(scores, ref_scores, rtol=1e-10, atol=1e-11)
    for name in ref_state:
        numpy.testing.assert_allclose(state[name], ref_state[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("model", ["lenet", "lenet-bn", "lenet-bn-concise"])
@pytest.mark.parametrize("family", ["reference"] + FAMILIES)
def test_which_code_runs_is_what_the_switch_says(model, family):
    """Counted through the op registry: under the reference, every forward and backward of a training step and a
    prediction is the readable code of tinybn/functional/ (or the engine's arithmetic); under a family, the ops
    it has a kernel for run it (where it applies), everything else the reference."""
    from collections import Counter

    tinybn.manual_seed(0)
    net = build_model(model)
    images = tinybn.tensor(numpy.random.default_rng(0).random((4, 1, 28, 28)).astype(numpy.float32))
    with ops.observe(ops.Recorder()) as recorder, kernels.using(family):
        F.cross_entropy(net(images), tinybn.tensor(numpy.arange(4))).backward()
        net.eval()
        with tinybn.no_grad():
            net(images)
    covered = set(kernels.covered(family)) if family != "reference" else set()
    layer_ops = {tinybn.nn.Conv2d: "conv2d", tinybn.nn.Sigmoid: "sigmoid", tinybn.nn.MaxPool2d: "max_pool2d",
                 tinybn.nn.Linear: "linear", tinybn.nn.Flatten: "flatten"}
    layers = Counter((op, family if op in covered else "reference")
                     for op in (layer_ops.get(type(layer), "batch_norm") for layer in net))
    counted = Counter((implementation.op, implementation.label, phase) for implementation, phase in recorder.calls)
    expected = Counter({("cross_entropy", "reference", "forward"): 1, ("cross_entropy", "reference", "backward"): 1})
    for (op, label), n in layers.items():
        expected[(op, label, "forward")] += 2 * n
        expected[(op, label, "backward")] += n
    assert counted == expected
    for implementation, _ in recorder.calls:
        if implementation.label == "reference":
            assert implementation.forward.__module__.startswith("tinybn.functional."), implementation
        else:
            assert implementation.forward.__module__.startswith(f"tinybn.{family}_kernels."), implementation
        assert implementation.backward.__module__ == implementation.forward.__module__


def test_describe_says_the_reference_runs_on_a_gpu():
    """The first GPU run printed "kernels: numba for batch_norm, conv2d, ..." while the reference ran every op on
    CuPy: the compiled families are CPU kernels, and the line now says what runs on the device given."""
    line = kernels.describe("numba", device="cuda:0")
    assert line.startswith("kernels: the readable reference for every op on cuda:0") and "CPU only" in line
    assert kernels.describe("reference", device="cuda:0").startswith("kernels: the readable reference for every op")


# ---- found as defects (once in test_regressions.py), each named after what it holds


@pytest.mark.parametrize("family", tinybn.kernels.available()[1:])
def test_kernel_conv2d_batch_of_one_reads_only_its_input(family):
    """The batch-last copy of a (1, C, H, W) input keeps the NCHW batch stride on its size-1 axis; the old fast
    im2col stepped along that axis and read outside the buffer (NaN, 1e30, or a segmentation fault)."""
    x, w, b = rng.standard_normal((1, 1, 28, 28)), rng.standard_normal((6, 1, 5, 5)), rng.standard_normal(6)
    with tinybn.kernels.using(family):
        y = F.conv2d(tinybn.tensor(x), tinybn.tensor(w), tinybn.tensor(b)).numpy()
    expected = F.conv2d(tinybn.tensor(x), tinybn.tensor(w), tinybn.tensor(b)).numpy()
    assert numpy.isfinite(y).all()
    numpy.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("nan_at", [[(0, 1)], [(0, 1), (1, 0)], [(1, 1), (0, 0)], [(2, 3), (3, 2), (0, 2)]])
def test_kernel_max_pool_routes_a_nan_window_like_the_reference(nan_at):
    """NumPy's argmax (the reference) counts a window's first NaN as its maximum; a fast path kept the sub-grid
    it had before the NaN, so the gradient went elsewhere."""
    x = rng.permutation(16).astype(float).reshape(1, 1, 4, 4)
    for i, j in nan_at:
        x[0, 0, i, j] = numpy.nan
    dy = rng.standard_normal((1, 1, 2, 2))
    grads = []
    for family in tinybn.kernels.available():
        t = tinybn.tensor(x, requires_grad=True)
        with tinybn.kernels.using(family):
            y = F.max_pool2d(t, 2)
        y.backward(dy)
        grads.append(t.grad)
    for grad in grads[1:]:
        numpy.testing.assert_array_equal(grad, grads[0])

@pytest.mark.parametrize("family", tinybn.kernels.available())
def test_conv2d_and_pooling_take_empty_batches_and_channels(family):
    with tinybn.kernels.using(family):
        for x_shape, w_shape in [((0, 1, 5, 5), (2, 1, 3, 3)), ((2, 0, 5, 5), (2, 0, 3, 3))]:
            x, w = tinybn.tensor(numpy.zeros(x_shape), requires_grad=True), tinybn.tensor(numpy.ones(w_shape),
                                                                                          requires_grad=True)
            F.conv2d(x, w).sum().backward()
            assert x.grad.shape == x_shape and w.grad.shape == w_shape
        x = tinybn.tensor(numpy.zeros((0, 1, 4, 4)), requires_grad=True)
        F.max_pool2d(x, 2).sum().backward()
        assert x.grad.shape == (0, 1, 4, 4)

@pytest.mark.parametrize("family", tinybn.kernels.available())
def test_a_float64_loss_reaches_float32_kernels_as_float32(family):
    """The upstream gradient of a float64 loss (a float32 net against float64 targets) crashed the fast linear
    and conv2d backward (np.dot's out= takes only its own dtype); PyTorch casts a gradient to its tensor's dtype."""
    for net, shape in [(nn.Sequential(nn.Linear(5, 8), nn.Sigmoid(), nn.Linear(8, 1)), (4, 5)),
                       (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 1)), (4, 1, 5, 5))]:
        x = tinybn.tensor(rng.random(shape).astype(numpy.float32))
        with tinybn.kernels.using(family):
            ((net(x) - rng.random((4, 1))) ** 2).mean().backward()
        assert all(p.grad.dtype == numpy.float32 for p in net.parameters())

_USE_TINYBN = r"""
import ctypes
malloc_options = []                       # every lookup of glibc's mallopt through ctypes, from here on
_lookup = ctypes.CDLL.__getattr__
def _watch(library, name):
    if name == "mallopt":
        malloc_options.append(name)
    return _lookup(library, name)
ctypes.CDLL.__getattr__ = _watch
import numpy, threadpoolctl
def blas_threads():
    return {(pool["internal_api"], pool["filepath"]): pool["num_threads"] for pool in threadpoolctl.threadpool_info()}
found = (blas_threads(), numpy.get_printoptions(), numpy.geterr())
import matplotlib
backend = matplotlib.get_backend()
import tinybn
from tinybn.app.train import TrainConfig, train
assert (blas_threads(), numpy.get_printoptions(), numpy.geterr()) == found, "import tinybn changed something"
tinybn.kernels.use("fastest")
rng = numpy.random.default_rng(0)
data = (rng.integers(0, 256, (600, 1, 28, 28), numpy.uint8), rng.integers(0, 10, 600),
        rng.integers(0, 256, (200, 1, 28, 28), numpy.uint8), rng.integers(0, 10, 200))
import sys, tempfile
with tempfile.TemporaryDirectory() as out:
    train(TrainConfig(epochs=1, batch_size=64, out=out, progress=False, plot=True), log=lambda *a: None, data=data)
pools = {pool: threads for pool, threads in blas_threads().items() if pool in found[0]}   # numba adds its own,
after = (pools, numpy.get_printoptions(), numpy.geterr())                            # listed in any order
assert after == found, (found, after)
assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())
assert not malloc_options, "mallopt was looked up"
print("unchanged", found[0])
"""

def test_using_tinybn_from_python_leaves_blas_numpy_allocator_and_matplotlib_as_found():
    """The first fast op once put NumPy's OpenBLAS on one thread for the whole process and changed glibc's mallopt
    thresholds; train() changed NumPy's print options and matplotlib's backend. With the fastest kernels, nothing
    outside tinybn changes: not BLAS's threads, not the allocator (nothing looks up mallopt any more)."""
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("matplotlib")
    import os
    import subprocess
    import sys

    env = dict(os.environ, MPLBACKEND="svg")      # a backend train() would notice if it switched to Agg
    done = subprocess.run([sys.executable, "-c", _USE_TINYBN], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("unchanged")


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
def test_the_float32_sigmoid_is_within_three_units_in_the_last_place_everywhere(family):
    """The numba family's float32 sigmoid computes e^t itself (a range reduction and a Taylor polynomial): against
    the sigmoid in float64 rounded to float32, over a sweep of float32's range, the range's edges (±87, where 2^n
    leaves the normal numbers), signed zeros, infinities, NaN and numbers whose sigmoid is subnormal."""
    sweep = numpy.linspace(-110, 110, 2_000_003, dtype=numpy.float32)
    edges = numpy.array([0.0, -0.0, 87.0, -87.0, numpy.nextafter(-87.0, 0.0), numpy.nextafter(-87.0, -100.0),
                         -88.8, -100.0, -103.5, -104.0, 1e-45, -1e-45, 0.34657359, -0.34657359, 1e4, -1e4,
                         numpy.inf, -numpy.inf, numpy.nan], numpy.float32)
    x = numpy.concatenate([sweep, edges, sweep[::-1][:5000]])
    with kernels.using(family):
        y = F.sigmoid(x).data
    truth = numpy.empty(x.shape)
    with numpy.errstate(over="ignore"):
        truth[:] = 1.0 / (1.0 + numpy.exp(-x.astype(numpy.float64)))
    assert numpy.array_equal(numpy.isnan(y), numpy.isnan(x))
    finite = ~numpy.isnan(x)
    units = numpy.spacing(truth[finite].astype(numpy.float32)).astype(numpy.float64)
    assert numpy.max(numpy.abs(y[finite] - truth[finite]) / units) <= 3
    assert numpy.array_equal(y[x == -numpy.inf], [0.0]) and numpy.array_equal(y[x == numpy.inf], [1.0])


LENET_SIZES = [
    ("conv1", lambda x, w, b: F.conv2d(x, w, b), [(1, 1, 28, 28), (6, 1, 5, 5), (6,)]),
    ("conv2", lambda x, w, b: F.conv2d(x, w, b), [(1, 6, 12, 12), (16, 6, 5, 5), (16,)]),
    ("dense 1", F.linear, [(1, 256), (120, 256), (120,)]),
    ("batch norm 1", lambda x, g, b: F.batch_norm(x, g, b, numpy.zeros(6, x.dtype), numpy.ones(6, x.dtype),
                                                  training=True)[0], [(1, 6, 24, 24), (6,), (6,)]),
    ("sigmoid 1", F.sigmoid, [(1, 6, 24, 24)]),
    ("pooling 1", lambda x: F.max_pool2d(x, 2), [(1, 6, 24, 24)]),
]


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, call, shapes", LENET_SIZES, ids=[s[0] for s in LENET_SIZES])
def test_at_lenets_own_sizes_in_float32_the_kernels_are_as_accurate_as_the_reference(name, call, shapes, family):
    """Batch 256 at LeNet-BN's shapes, float32: outputs and every gradient (a random upstream gradient) of the
    kernel and of the reference, each against the reference in float64. The kernels sum in other orders (and
    conv2d's and linear's weight gradients over the batch in float32, in registers), so they may differ from the
    reference by its rounding; their error against float64 must stay within twice the reference's own, or within
    1e-6 of the largest value (about eight float32 roundings), whichever is larger."""
    generator = numpy.random.default_rng(5)
    arrays = [generator.standard_normal((256,) + shape[1:] if i == 0 else shape) for i, shape in enumerate(shapes)]
    upstream = None

    def run(dtype, chosen):
        nonlocal upstream
        tensors_ = [tinybn.tensor(a.astype(dtype), requires_grad=True) for a in arrays]
        with kernels.using(chosen), ops.observe(ops.Recorder()) as recorder:
            out = call(*tensors_)
            upstream = generator.standard_normal(out.shape) if upstream is None else upstream
            (out * tinybn.tensor(upstream.astype(dtype))).sum().backward()
        assert chosen in {i.label for i, _ in recorder.calls}, recorder.calls
        return [out.data.astype(numpy.float64)] + [t.grad.astype(numpy.float64) for t in tensors_]

    exact = run(numpy.float64, "reference")
    reference, kernel = run(numpy.float32, "reference"), run(numpy.float32, family)
    for what, e, r, k in zip(["output"] + [f"gradient {i}" for i in range(len(arrays))], exact, reference, kernel):
        scale = numpy.max(numpy.abs(e)) or 1.0
        reference_error, kernel_error = numpy.max(numpy.abs(r - e)) / scale, numpy.max(numpy.abs(k - e)) / scale
        assert kernel_error <= max(2 * reference_error, 1e-6), (what, kernel_error, reference_error)


@needs_a_family
@pytest.mark.parametrize("family", FAMILIES)
def test_the_float32_sigmoid_of_a_number_does_not_depend_on_its_neighbours(family):
    """Numbers beyond the float32 kernel's range (|x| > 87, NaN) are computed again by the reference's formula, in
    float32, one by one: a 100 or a NaN in the same block once made the kernel recompute the whole block in float64,
    changing a quarter of its neighbours by one unit in the last place, and their gradients."""
    x = numpy.random.default_rng(3).standard_normal(4095).astype(numpy.float32) * 6
    with kernels.using(family):
        alone = F.sigmoid(x).data
        for neighbour in (100.0, -100.0, numpy.nan, numpy.inf, -88.0):
            beside = F.sigmoid(numpy.append(x, numpy.float32(neighbour))).data
            assert numpy.array_equal(beside[:-1], alone), neighbour
    far = numpy.array([17.0, 87.5, -87.5, 88.8, -88.8, -100.0, -103.5, 1e4, -1e4, numpy.nan, numpy.inf, -numpy.inf],
                      numpy.float32)
    with kernels.using(family):
        mine = F.sigmoid(numpy.concatenate([x, far])).data[x.size:]
    reference = F.sigmoid(far).data                # its formula in float32; exp from the C library, not NumPy's
    assert numpy.array_equal(numpy.isnan(mine), numpy.isnan(reference))
    numpy.testing.assert_array_max_ulp(mine[~numpy.isnan(far)], reference[~numpy.isnan(far)], maxulp=1)
