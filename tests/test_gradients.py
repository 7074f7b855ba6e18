"""One table of gradient checks: every op, every differentiable input, several shapes, both BN modes.

Each row gives the op, its arguments as (name, array, requires_grad) and the call. The check runs in
float64 with central differences and a random upstream gradient (tinybn.gradcheck), along explicit axes:

* device: NumPy ("cpu"), the strict CuPy stand-in, and CuPy when a GPU is present;
* implementation: the readable reference everywhere, and on the CPU also each installed kernel family for the
  rows its kernels apply to (``kernel=True``); the test checks that exactly that implementation ran, so every
  row tests what its name says;
* layout (CPU): the first input C-contiguous, batch-last (axis 0 stored last) or a strided slice.
"""
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import numpy
import pytest

import tinybn
from tinybn import functional as F, kernels, ops
from tinybn.autograd import Cache, apply
from tinybn.communicator import LocalCommunicator

from conftest import DEVICES, Samples, make
from props import with_layout

samples = Samples(1234)
randn, positive, distinct = samples.randn, samples.positive, samples.distinct


@dataclass
class Row:
    name: str
    call: Callable
    args: list  # (array, requires_grad) pairs, in the order of call's arguments
    kernel: bool = False  # a compiled kernel applies to this row on the CPU

    def __str__(self):
        return self.name


def bn(training, momentum=0.9):
    def call(x, gamma, beta, moving_mean, moving_var):
        return F.batch_norm(x, gamma, beta, moving_mean, moving_var, training=training, momentum=momentum)
    return call


ROWS = [
    # convolution: stride 2, padding 1-2, non-square kernels and inputs, batch 2
    Row("conv2d k3x2 s2 p1", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
        [(randn(2, 3, 7, 6), True), (randn(4, 3, 3, 2), True), (randn(4), True)]),
    Row("conv2d k2x3 s(1,2) p(2,1) no bias", lambda x, w: F.conv2d(x, w, stride=(1, 2), padding=(2, 1)),
        [(randn(2, 2, 5, 7), True), (randn(3, 2, 2, 3), True)]),
    Row("conv2d k5 s1 p0 (LeNet)", lambda x, w, b: F.conv2d(x, w, b),
        [(randn(2, 1, 8, 9), True), (randn(2, 1, 5, 5), True), (randn(2), True)], kernel=True),
    # pooling
    Row("max_pool2d k2 s2", lambda x: F.max_pool2d(x, 2, 2), [(distinct(2, 3, 6, 4), True)], kernel=True),
    Row("max_pool2d k3 s2 p1", lambda x: F.max_pool2d(x, 3, 2, 1), [(distinct(2, 2, 7, 6), True)]),
    Row("max_pool2d k(2,3) s(1,2)", lambda x: F.max_pool2d(x, (2, 3), (1, 2)), [(distinct(2, 2, 5, 7), True)]),
    Row("avg_pool2d k2 s2", lambda x: F.avg_pool2d(x, 2), [(randn(2, 3, 6, 4), True)]),
    Row("avg_pool2d k(3,2) s(2,1) p1", lambda x: F.avg_pool2d(x, (3, 2), (2, 1), 1), [(randn(2, 2, 7, 5), True)]),
    # dense and elementwise
    Row("linear", F.linear, [(randn(3, 5), True), (randn(4, 5), True), (randn(4), True)], kernel=True),
    Row("linear no bias", F.linear, [(randn(2, 6), True), (randn(3, 6), True)], kernel=True),
    Row("linear leading axes", F.linear, [(randn(2, 3, 5), True), (randn(4, 5), True), (randn(4), True)]),
    Row("sigmoid", F.sigmoid, [(randn(3, 4) * 3, True)], kernel=True),
    Row("relu", F.relu, [(randn(3, 4) + 0.05, True)]),
    Row("flatten", F.flatten, [(randn(2, 3, 2, 2), True)]),
    Row("dropout p0.4 train", lambda x: F.dropout(x, 0.4, True, tinybn.get_array_module(x.data).random.default_rng(7)),
        [(randn(4, 5), True)]),
    Row("dropout eval", lambda x: F.dropout(x, 0.4, False), [(randn(4, 5), True)]),
    Row("cross_entropy", lambda z, t: F.cross_entropy(z, t),
        [(randn(5, 4), True), (numpy.array([0, 3, 1, 1, 2]), False)]),
    # batch norm: 2-D and 4-D, training and prediction, gamma shaped (C,) or (1, C[, 1, 1])
    Row("batch_norm 2-D train", bn(True),
        [(randn(6, 4) * 2 + 1, True), (positive(4), True), (randn(4), True), (randn(4), False), (positive(4), False)],
        kernel=True),
    Row("batch_norm 4-D train", bn(True),
        [(randn(2, 3, 3, 2), True), (positive(1, 3, 1, 1), True), (randn(1, 3, 1, 1), True),
         (randn(1, 3, 1, 1), False), (positive(1, 3, 1, 1), False)], kernel=True),
    Row("batch_norm 2-D eval", bn(False),
        [(randn(5, 3), True), (positive(1, 3), True), (randn(1, 3), True), (randn(1, 3), False),
         (positive(1, 3), False)], kernel=True),
    Row("batch_norm 4-D eval", bn(False),
        [(randn(2, 3, 2, 3), True), (positive(3), True), (randn(3), True), (randn(3), False), (positive(3), False)],
        kernel=True),
    # the synchronized ops themselves, over one rank (F.sync_* would hand one rank to the plain op); over several
    # ranks (threads) their gradients are checked by central differences of the global function in
    # test_sync_batchnorm.py. Batch renorm's r and d are held at 1 and 0, where holding them is exact.
    Row("sync_batch_norm 4-D train, the op on one rank",
        lambda x, g, b, mm, mv: apply("sync_batch_norm", x, g, b, mm, mv, comm=LocalCommunicator())[0],
        [(randn(3, 2, 2, 2), True), (positive(2), True), (randn(2), True), (randn(2), False), (positive(2), False)]),
    Row("sync_batch_renorm 2-D train, the op on one rank", lambda x, g, b, mm, mv: apply(
        "sync_batch_renorm", x, g, b, mm, mv, r_max=1.0, d_max=0.0, comm=LocalCommunicator())[0],
        [(randn(5, 3), True), (positive(3), True), (randn(3), True), (randn(3), False), (positive(3), False)]),
    Row("sync_decorrelated_batch_norm train, the op on one rank", lambda x, g, b, mm, mw: apply(
        "sync_decorrelated_batch_norm", x, g, b, mm, mw, group_size=2, eps=1e-2, comm=LocalCommunicator())[0],
        [(randn(6, 3, 2, 2), True), (positive(3), True), (randn(3), True), (randn(3), False), (numpy.eye(3), False)]),
    # the normalization family (more in test_normalization.py: PyTorch, and batch renorm with r, d held constant)
    Row("layer_norm over (C, H, W)", lambda x, w, b: F.layer_norm(x, (3, 2, 2), w, b),
        [(randn(2, 3, 2, 2) * 2 + 1, True), (positive(3, 2, 2), True), (randn(3, 2, 2), True)]),
    Row("group_norm 2 groups", lambda x, w, b: F.group_norm(x, 2, w, b),
        [(randn(2, 4, 2, 3), True), (positive(4), True), (randn(4), True)]),
    Row("batch_renorm train, r and d at their limits 1 and 0",
        lambda x, g, b, mm, mv: F.batch_renorm(x, g, b, mm, mv, training=True, r_max=1.0, d_max=0.0)[0],
        [(randn(5, 3, 2, 2), True), (positive(3), True), (randn(3), True), (randn(3), False), (positive(3), False)]),
    Row("batch_renorm eval", lambda x, g, b, mm, mv: F.batch_renorm(x, g, b, mm, mv, training=False)[0],
        [(randn(4, 3), True), (positive(3), True), (randn(3), True), (randn(3), False), (positive(3), False)]),
    Row("decorrelated_batch_norm train, groups of 2", lambda x, g, b, mm, mw: F.decorrelated_batch_norm(
        x, g, b, mm, mw, training=True, group_size=2, eps=1e-2)[0],
        [(randn(6, 3, 2, 2), True), (positive(3), True), (randn(3), True), (randn(3), False), (numpy.eye(3), False)]),
    # the tensor arithmetic the engine offers
    Row("add broadcast", lambda a, b: a + b, [(randn(3, 4), True), (randn(4), True)]),
    Row("sub broadcast", lambda a, b: a - b, [(randn(3, 1), True), (randn(1, 4), True)]),
    Row("mul broadcast", lambda a, b: a * b, [(randn(2, 3, 4), True), (randn(3, 1), True)]),
    Row("div broadcast", lambda a, b: a / b, [(randn(3, 4), True), (positive(4), True)]),
    Row("pow scalar", lambda a: a ** 3, [(randn(3, 4), True)]),
    Row("pow tensor", lambda a, b: a ** b, [(positive(3, 4), True), (randn(4), True)]),
    Row("neg", lambda a: -a, [(randn(3), True)]),
    Row("matmul", lambda a, b: a @ b, [(randn(3, 4), True), (randn(4, 2), True)]),
    Row("matmul batched", lambda a, b: a @ b, [(randn(2, 3, 4), True), (randn(4, 2), True)]),
    Row("sum axis", lambda a: a.sum(axis=1), [(randn(3, 4, 2), True)]),
    Row("mean keepdims", lambda a: a.mean(axis=(0, 2), keepdims=True), [(randn(3, 4, 2), True)]),
    Row("reshape", lambda a: a.reshape(4, 3), [(randn(3, 4), True)]),
    Row("transpose", lambda a: a.transpose(2, 0, 1), [(randn(3, 4, 2), True)]),
    Row("getitem fancy (repeats)", lambda a: a[[0, 2, 0]], [(randn(3, 4), True)]),
    Row("exp/log", lambda a: (a.exp() + 1.0).log(), [(randn(3, 4), True)]),
]


LAYOUTS = ("contiguous", "batch_last", "sliced")


def _axes():
    for row in ROWS:
        for device in DEVICES:
            for implementation in ["reference"] + (kernels.available()[1:] if device == "cpu" and row.kernel else []):
                for layout in LAYOUTS if device == "cpu" else ("contiguous",):
                    study = device == "cpu" and implementation == "reference" and layout == "contiguous"
                    yield pytest.param(row, device, implementation, layout, marks=[pytest.mark.study] if study else [],
                                       id=f"{row.name}-{device}-{implementation}-{layout}")


@pytest.mark.parametrize("row, device, implementation, layout", list(_axes()))
def test_gradient(row, device, implementation, layout):
    inputs = [make(array, device, requires_grad=needs) for array, needs in row.args]
    if device == "cpu":   # the first input in the row's layout, handed over without a copy
        first, needs = row.args[0]
        inputs[0] = tinybn.Tensor(with_layout(numpy.asarray(first, numpy.float64), layout), requires_grad=needs)
    with ops.observe(ops.Recorder()) as recorder, kernels.using(implementation):
        report = tinybn.gradcheck(row.call, inputs)
    assert report["ok"], f"{row.name}: {report}"
    assert report["where"] is not None
    op = row.name.split()[0]
    labels = {i.label for i, _ in recorder.calls if i.op == op}
    assert labels in ({implementation}, set()), f"{row.name}: ran {labels}, not {implementation}"
    if row.kernel:
        assert labels == {implementation}, f"{row.name}: {op} did not run"


def test_every_op_has_a_row():
    """A new op in tinybn.functional must get a row in the table above."""
    names = " ".join(row.name for row in ROWS)
    for op in F.__all__:
        assert op in names, f"{op} has no gradient-check row"


def _double_forward(x):
    return x * 2.0, Cache()


def _constant_backward(dy, cache):
    return (dy.sum() * 0 + 2.0 * dy.mean() + 0 * dy,)  # constant gradient: right only when dy is constant


ops.define("tests.double_with_a_constant_gradient", _double_forward, _constant_backward)


def test_gradcheck_catches_a_wrong_backward():
    """A backward that is right for an all-ones upstream gradient but wrong otherwise must fail."""
    x = make(randn(4), "cpu", requires_grad=True)
    with pytest.raises(AssertionError, match="input 0"):
        tinybn.gradcheck(lambda t: apply("tests.double_with_a_constant_gradient", t), [x])


def test_a_failed_gradcheck_names_the_input_as_the_function_does_and_shows_no_gradcheck_source(tmp_path):
    """Issue 20: the failure said "input 0" for gamma, after 60 lines of gradcheck's own source in pytest's
    traceback. It names the parameter, the implementations it checked, and pytest hides gradcheck's frame."""
    x = make(randn(4, 3), "cpu", requires_grad=True)
    gamma = make(randn(3), "cpu", requires_grad=True)
    with pytest.raises(AssertionError) as raised:
        tinybn.gradcheck(lambda x, gamma: apply("tests.double_with_a_constant_gradient", gamma) * x, [x, gamma])
    message = str(raised.value)
    assert "gamma (input 1)" in message and "x (input 0)" not in message
    assert "tests.double_with_a_constant_gradient [reference]" in message and "mul [reference]" in message
    assert [name.split(" [")[0] for name in tinybn.gradcheck(F.sigmoid, [x])["checked"]] == ["sigmoid"]
    failing = tmp_path / "test_failing.py"
    failing.write_text("import numpy, tinybn\n"
                       "def test_it():\n"
                       "    x = tinybn.tensor(numpy.ones(3), requires_grad=True)\n"
                       "    tinybn.gradcheck(lambda x: x * tinybn.tensor(x.data.copy()), [x])\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(failing)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "x (input 0)" in done.stdout, done.stdout
    assert "def gradcheck" not in done.stdout and "_to_float64_inputs" not in done.stdout, done.stdout


def test_gradcheck_rejects_no_differentiable_input():
    with pytest.raises(ValueError, match="requires_grad"):
        tinybn.gradcheck(F.sigmoid, [make(randn(3), "cpu")])
