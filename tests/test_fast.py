"""The fast paths (tinybn.fast) against the readable reference (tinybn.functional).

One table of cases a fast path accepts. For each: the fast pair is really the one chosen, it agrees
with the reference on outputs and gradients (float64 tightly, float32 to rounding), and its own
backward passes a numerical gradient check. Then: the cases that must fall back to the reference,
the switch, and whole LeNet-BN training steps, fast against reference.
"""
import contextlib
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy
import pytest

import tinybn
from tinybn import fast, ops
from tinybn import functional as F
from tinybn.app.models import build_model
from tinybn.optim import SGD

from conftest import Samples
from test_data import needs_data

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
]


def tensors(case, dtype):
    """The case's arrays in ``dtype``, keeping their memory layout (tinybn.tensor would copy to C order)."""
    return [tinybn.Tensor(a.astype(dtype, order="K") if a.dtype.kind == "f" else a, requires_grad=needs)
            for a, needs in case.args]


def reference(call):
    def run(*inputs):
        with fast.disabled():
            return call(*inputs)
    return run


def ran(call, *args):
    """The (op, label) of every forward that ran during ``call(*args)``."""
    with ops.observe(ops.Recorder()) as recorder:
        call(*args)
    return [(implementation.op, implementation.label) for implementation, phase in recorder.calls if phase == "forward"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_path_is_chosen(case):
    assert (case.op, "fast") in ran(case.call, *tensors(case, numpy.float32))


@pytest.mark.parametrize("dtype, atol, rtol", [(numpy.float64, 1e-12, 1e-10), (numpy.float32, 1e-5, 1e-4)])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_equals_reference(case, dtype, atol, rtol):
    inputs = tensors(case, dtype)
    tinybn.assert_same(case.call, reference(case.call), inputs, atol=atol, rtol=rtol)


@pytest.fixture
def in_pieces(monkeypatch):
    """Even these small arrays cut into pieces (im2col and col2im one output row at a time) and shared
    among 3 threads, to test the threaded code."""
    for name in ("PIECE_ELEMENTS", "CHUNK_BYTES", "COL2IM_BYTES", "PRODUCT_WORK"):
        monkeypatch.setattr(fast.cpu, name, 1)
    monkeypatch.setattr(fast.parallel, "_cores", lambda: 3)     # all 3 take pieces, even on 2 cores
    before = fast.parallel.threads()
    fast.parallel.set_threads(3)
    yield
    fast.parallel.set_threads(before)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_in_pieces_equals_reference(case, in_pieces):
    inputs = tensors(case, numpy.float64)
    tinybn.assert_same(case.call, reference(case.call), inputs, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.gradcheck], ids=str)
def test_fast_in_pieces_gradcheck(case, in_pieces):
    report = tinybn.gradcheck(case.call, tensors(case, numpy.float64))
    assert report["ok"], f"{case.name}: {report}"


@pytest.mark.parametrize("case", [c for c in CASES if c.gradcheck], ids=str)
def test_fast_backward_gradcheck(case):
    report = tinybn.gradcheck(case.call, tensors(case, numpy.float64))
    assert report["ok"], f"{case.name}: {report}"


def test_fast_outputs_are_batch_last():
    """The layout contract that lets the next fast op skip a copy: NCHW shape, (C, H, W, N) memory."""
    x = randn(2, 3, 8, 8)
    outputs = [F.conv2d(x, randn(4, 3, 3, 3)), F.max_pool2d(x, 2),
               F.batch_norm(x, positive(3), randn(3), randn(3), positive(3), training=True)[0]]
    for out in outputs:
        assert out.data.transpose(1, 2, 3, 0).flags.c_contiguous
    assert F.sigmoid(outputs[0]).data.strides == outputs[0].data.strides


def test_fast_batch_norm_returns_the_same_moving_averages():
    x, gamma, beta, mean, var = randn(4, 3, 2, 2) * 3 + 2, positive(3), randn(3), randn(3), positive(3)
    fast_out = F.batch_norm(x, gamma, beta, mean, var, training=True, momentum=0.8)
    ref_out = reference(lambda *a: F.batch_norm(*a, training=True, momentum=0.8))(x, gamma, beta, mean, var)
    for name, f, r in zip(("y", "moving_mean", "moving_var"), fast_out, ref_out):
        numpy.testing.assert_allclose(f.data, r.data, rtol=1e-12, atol=1e-12, err_msg=name)


def test_fast_sigmoid_saturates_without_warnings():
    x = numpy.array([-1e4, -100.0, -88.8, -20.0, 0.0, 20.0, 100.0, 1e4], numpy.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.sigmoid(x).data
    with fast.disabled():
        expected = F.sigmoid(x).data
    assert numpy.all(numpy.isfinite(y))
    numpy.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-37)


def test_fast_conv_rejects_a_kernel_larger_than_the_input():
    with pytest.raises(ValueError, match="does not fit"):
        F.conv2d(randn(1, 1, 3, 3), randn(1, 1, 5, 5))


FALLBACKS = [
    ("conv2d stride 2", lambda: F.conv2d(randn(1, 2, 6, 6), randn(3, 2, 3, 3), stride=2), "conv2d"),
    ("conv2d mixed dtypes", lambda: F.conv2d(randn(1, 2, 6, 6).astype(numpy.float32), randn(3, 2, 3, 3)), "conv2d"),
    ("max_pool2d overlapping", lambda: F.max_pool2d(randn(1, 2, 6, 6), 3, 2), "max_pool2d"),
    ("max_pool2d padded", lambda: F.max_pool2d(randn(1, 2, 6, 6), 2, 2, 1), "max_pool2d"),
    ("max_pool2d ragged", lambda: F.max_pool2d(randn(1, 2, 5, 6), 2), "max_pool2d"),
    ("batch_norm 2-D", lambda: F.batch_norm(randn(4, 3), positive(3), randn(3), randn(3), positive(3),
                                            training=True), "batch_norm"),
    ("sigmoid of integers", lambda: F.sigmoid(numpy.arange(3)), "sigmoid"),
    ("conv2d channel mismatch", lambda: _raises(lambda: F.conv2d(randn(1, 2, 6, 6), randn(3, 4, 3, 3))), "conv2d"),
]


def _raises(call):
    """Malformed input goes to the reference, which raises its own error."""
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("name, run, op", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_unsupported_cases_run_the_reference(name, run, op):
    labels = [label for ran_op, label in ran(run) if ran_op == op]
    if name == "conv2d channel mismatch":       # refused by tinybn.functional before any implementation runs
        assert labels == []
    else:
        assert labels and set(labels) == {"reference"}, labels


def test_other_array_modules_run_the_reference():
    """CuPy (here: the strict stand-in) never meets the NumPy fast paths."""
    x_data, w_data = randn(2, 1, 6, 6), randn(2, 1, 3, 3)
    results = {}
    for device in ("strict", "cpu"):  # the stand-in raises if a NumPy function meets its arrays
        x = tinybn.tensor(x_data, device=device, requires_grad=True)
        w = tinybn.tensor(w_data, device=device, requires_grad=True)
        y = F.max_pool2d(F.sigmoid(F.conv2d(x, w)), 2)
        y.sum().backward()
        results[device] = tinybn.backend.to_numpy(y.data), tinybn.backend.to_numpy(x.grad)
    assert tinybn.get_array_module(x.grad) is numpy
    for strict_value, numpy_value in zip(results["strict"], results["cpu"]):
        numpy.testing.assert_allclose(strict_value, numpy_value, rtol=1e-12)


def test_switch_off_and_on():
    sigmoid = ops.get("sigmoid")
    assert fast.enabled()
    with fast.disabled():
        assert not fast.enabled()
        assert ops.choose(sigmoid, [randn(3)], {}).label == "reference"
    assert fast.enabled()
    assert ops.choose(sigmoid, [randn(3)], {}).forward is fast.cpu.sigmoid_forward


def test_environment_variable_turns_fast_paths_off():
    code = ("import tinybn, numpy; "
            "print(tinybn.fast.enabled(), tinybn.ops.choose(tinybn.ops.get('sigmoid'), [numpy.ones(2)], {}).label)")
    env = dict(os.environ, TINYBN_FAST="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "reference"]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("model", ["lenet-bn", "lenet-bn-concise", "lenet"])
def test_training_steps_fast_equal_reference(model, threads, monkeypatch):
    """Three SGD steps of a whole model: the same losses and the same weights, fast or not, and however
    many threads share the fast paths' work (cut into the smallest pieces)."""
    for name in ("PIECE_ELEMENTS", "CHUNK_BYTES", "COL2IM_BYTES", "PRODUCT_WORK"):
        monkeypatch.setattr(fast.cpu, name, 1)
    monkeypatch.setattr(fast.parallel, "_threads", threads)
    monkeypatch.setattr(fast.parallel, "_cores", lambda: threads)
    images = numpy.random.default_rng(0).random((16, 1, 28, 28)).astype(numpy.float64)
    labels = numpy.arange(16) % 10

    def train(use_fast):
        tinybn.manual_seed(3)
        net = build_model(model).to(dtype=numpy.float64)
        optimizer = SGD(net.parameters(), lr=0.5)
        losses = []
        with contextlib.nullcontext() if use_fast else fast.disabled():
            for _ in range(3):
                loss = F.cross_entropy(net(tinybn.tensor(images)), tinybn.tensor(labels))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.item()))
            net.eval()
            with tinybn.no_grad():
                scores = net(tinybn.tensor(images)).data
        return losses, net.state_dict(), scores

    fast_losses, fast_state, fast_scores = train(True)
    ref_losses, ref_state, ref_scores = train(False)
    numpy.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-10)
    numpy.testing.assert_allclose(fast_scores, ref_scores, rtol=1e-9, atol=1e-10)
    for name in ref_state:
        numpy.testing.assert_allclose(fast_state[name], ref_state[name], rtol=1e-9, atol=1e-11, err_msg=name)



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_allocator_thresholds_are_set_only_by_tune_process():
    code = ("import numpy, tinybn; from tinybn import fast; "
            "tinybn.functional.sigmoid(tinybn.tensor(numpy.ones((512, 512)))); untouched = fast.memory._outcome is None; "
            "changes = fast.tune_process(); print(untouched, fast.memory._outcome, any('malloc' in c for c in changes))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]


@needs_data
def test_the_command_line_says_what_it_tunes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tinybn", "train", "--epochs", "1", "--train-subset", "256",
                          "--no-progress", "--no-plot", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert "tinybn: tuned this process: glibc malloc keeps freed blocks" in out.stderr


def test_max_pool_backward_after_a_forward_without_graph():
    """The argmax is kept only while recording; called by hand after no_grad, backward recomputes it."""
    x = with_ties((2, 3, 4, 6))
    dy = randn(2, 3, 2, 3)
    _, recorded = fast.cpu.max_pool2d_forward(x, 2, recording=True)
    _, unrecorded = fast.cpu.max_pool2d_forward(x, 2, recording=False)
    assert recorded.argmax is not None and unrecorded.argmax is None
    numpy.testing.assert_array_equal(fast.cpu.max_pool2d_backward(dy, unrecorded)[0],
                                     fast.cpu.max_pool2d_backward(dy, recorded)[0])



@pytest.mark.parametrize("model", ["lenet", "lenet-bn", "lenet-bn-concise"])
@pytest.mark.parametrize("use_fast", [False, True])
def test_which_code_runs_is_what_the_switch_says(model, use_fast):
    """Counted through the op registry: with the fast paths off, every forward and backward of a training step
    and a prediction is the readable code of tinybn/functional/ (or the engine's arithmetic); with them on, the
    ops that have a fast kernel run it, everything else the reference. Each layer's op runs once per
    forward and once per backward."""
    from collections import Counter

    tinybn.manual_seed(0)
    net = build_model(model)
    images = tinybn.tensor(numpy.random.default_rng(0).random((4, 1, 28, 28)).astype(numpy.float32))
    with ops.observe(ops.Recorder()) as recorder, contextlib.nullcontext() if use_fast else fast.disabled():
        F.cross_entropy(net(images), tinybn.tensor(numpy.arange(4))).backward()
        net.eval()
        with tinybn.no_grad():
            net(images)
    def op_and_label(layer):
        """The op a layer runs, and which implementation the switch should pick for it."""
        four_d = isinstance(layer, (tinybn.nn.Conv2d, tinybn.nn.MaxPool2d, tinybn.nn.BatchNorm2d)) or (
            isinstance(layer, tinybn.nn.BatchNorm) and layer.num_dims == 4)
        op = {tinybn.nn.Conv2d: "conv2d", tinybn.nn.Sigmoid: "sigmoid", tinybn.nn.MaxPool2d: "max_pool2d",
              tinybn.nn.Linear: "linear", tinybn.nn.Flatten: "flatten"}.get(type(layer), "batch_norm")
        fast_kernel = op in ("sigmoid", "linear") or (four_d and op in ("conv2d", "max_pool2d", "batch_norm"))
        return op, "fast" if use_fast and fast_kernel else "reference"

    layers = Counter(op_and_label(layer) for layer in net)
    counted = Counter((implementation.op, implementation.label, phase) for implementation, phase in recorder.calls)
    expected = Counter({("cross_entropy", "reference", "forward"): 1, ("cross_entropy", "reference", "backward"): 1})
    for (op, label), n in layers.items():
        expected[(op, label, "forward")] += 2 * n
        expected[(op, label, "backward")] += n
    assert counted == expected
    for implementation, _ in recorder.calls:
        if implementation.label == "fast":
            assert implementation.forward.__module__ == implementation.backward.__module__ == "tinybn.fast.cpu"
        else:
            assert implementation.forward.__module__.startswith("tinybn.functional."), implementation
            assert implementation.backward.__module__ == implementation.forward.__module__
