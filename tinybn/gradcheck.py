"""Numerical gradient checks.

:func:`gradcheck` compares the gradients that autograd computes with central finite differences::

    dL/dx[i] ≈ (L(x + h·e_i) − L(x − h·e_i)) / (2h),      L(x) = Σ f(x) · dy

where ``dy`` is a RANDOM upstream gradient. (With dy = 1, L = Σ f(x), and for batch norm
Σ_i y_i = Σ_i β, which does not depend on x at all: dL/dx = 0 everywhere, so a wrong input
gradient would pass. A random dy has no such blind spot.)

:func:`assert_same` checks that two implementations (a fast path and the readable reference)
agree on outputs and gradients.
"""
from __future__ import annotations

import inspect

import numpy

from . import backend, ops
from .autograd import Tensor, enable_grad


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree."""


def _to_float64_inputs(inputs):
    """Fresh tensors over float64 arrays: the caller's own arrays when they are float64 already (so their
    memory layout reaches ``fn``; gradcheck perturbs them in place and puts every value back), else copies.

    An input whose memory overlaps an earlier one's (``[x, x]``, or two views of one array) is copied:
    perturbing one input must not move another, or the finite difference would mix their gradients.
    """
    converted, seen = [], []
    for value in inputs:
        if isinstance(value, Tensor):
            data = value.data
            if data.dtype.kind == "f":
                xp = backend.get_array_module(data)
                writeable = getattr(getattr(data, "flags", None), "writeable", True)
                aliased = any(xp.may_share_memory(data, other) for other in seen)
                seen.append(data)
                data = data.astype(numpy.float64, copy=not writeable or aliased)
            converted.append(Tensor(data, requires_grad=value.requires_grad))
        else:
            converted.append(value)
    return converted


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def input_names(fn, count: int) -> list[str]:
    """What to call each input of ``fn`` in a report: its parameter's name where the signature gives one
    (``lambda x, gamma: ...`` gives "x" and "gamma"), else "input i"."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):          # a builtin or a callable without a signature
        parameters = []
    names = []
    for i in range(count):
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var = next((p for p in parameters if p.kind == p.VAR_POSITIONAL), None)
        if i < len(positional):
            names.append(f"{positional[i].name} (input {i})")
        elif var is not None:
            names.append(f"{var.name}[{i - len(positional)}] (input {i})")
        else:
            names.append(f"input {i}")
    return names


def _analytic_gradients(fn, inputs, checked, dy_seed):
    """Run ``fn`` once with autograd, with a random upstream gradient ``dy``; returns ``(dy, gradients, the
    implementations that ran)``, each gradient a host array of its input's shape."""
    with enable_grad(), ops.observe(ops.Recorder()) as recorder:
        out = _first_output(fn(*inputs))
        dy = backend.to_device(numpy.random.default_rng(dy_seed).standard_normal(out.shape), out.device)
        dy = dy.astype(numpy.float64)
        for i in checked:
            inputs[i].grad = None
        out.backward(dy)
    ran = sorted({f"{implementation.op} [{implementation.label}]" for implementation, _ in recorder.calls})
    grads = {i: backend.to_numpy(inputs[i].grad) if inputs[i].grad is not None else numpy.zeros(inputs[i].shape)
             for i in checked}
    return dy, grads, ran


def _numeric_gradient(objective, x, eps: float):
    """Central differences of ``objective()`` with respect to each element of the tensor ``x``, perturbed in
    place through its index (``x.data`` may be any strided view: a reshaped copy would check nothing)."""
    numeric = numpy.zeros(x.shape)
    for index in numpy.ndindex(*x.shape):
        original = float(x.data[index])
        try:
            x.data[index] = original + eps
            plus = objective()
            x.data[index] = original - eps
            minus = objective()
        finally:
            x.data[index] = original
        numeric[index] = (plus - minus) / (2 * eps)
    return numeric


def _compare(name, analytic, numeric, atol, rtol, report) -> str | None:
    """Update ``report`` with this input's worst element; returns a failure line, or None when all agree."""
    error = numpy.abs(analytic - numeric)
    if error.size == 0:      # an empty input: its (empty) gradient has the right shape, nothing else to compare
        return None
    worst = numpy.unravel_index(int(error.argmax()), error.shape)
    abs_err = float(error[worst])
    if abs_err >= report["worst_abs"]:
        report.update(worst_abs=abs_err, worst_rel=abs_err / max(float(abs(numeric[worst])), 1e-12),
                      where=f"{name}, index {tuple(map(int, worst))}")
    # a NaN or an infinity on either side is a failure (an infinite difference quotient checks nothing)
    bad = ~((error <= atol + rtol * numpy.abs(numeric)) & numpy.isfinite(numeric) & numpy.isfinite(analytic))
    if not bad.any():
        return None
    k = int(numpy.argmax(numpy.where(bad, error, -1.0)))
    idx = tuple(map(int, numpy.unravel_index(k, error.shape))) if error.shape else ()
    if report["where"] is None or not numpy.isfinite(abs_err):
        report["where"] = f"{name}, index {idx}"
    return (f"{name}, shape {error.shape}, at index {idx}: analytic {analytic.reshape(-1)[k]:.8g}, numeric "
            f"{numeric.reshape(-1)[k]:.8g}, |diff| {error.reshape(-1)[k]:.3g} ({int(bad.sum())} of {bad.size} "
            f"elements out of tolerance)")


def gradcheck(fn, inputs, *, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4, seed: int = 0,
              raise_on_failure: bool = True) -> dict:
    """Check autograd's gradients of ``fn(*inputs)`` against central differences, in float64.

    ``inputs`` is a sequence of tensors (and other arguments passed as they are); every tensor with
    ``requires_grad`` is checked, element by element. ``fn`` may return a tensor or a tuple whose
    first item is the differentiable output (as ``batch_norm`` does).

    Returns ``{"ok", "worst_abs", "worst_rel", "where", "checked"}``: ``where`` names the input (by its parameter
    name in ``fn`` where it has one, and position) and the index of the element with the largest error;
    ``checked`` lists the implementations whose backward was checked, as "op [reference]" or "op [numba]"
    (the kernel switch decides which run). Raises :class:`GradcheckError` with that
    report when some element has ``|analytic − numeric| > atol + rtol·|numeric|``.
    """
    __tracebackhide__ = True       # pytest shows the failure, not this function's source
    inputs = _to_float64_inputs(inputs)
    checked = [i for i, value in enumerate(inputs) if isinstance(value, Tensor) and value.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to check")
    dy, analytic, ran = _analytic_gradients(fn, inputs, checked, seed)
    names = input_names(fn, len(inputs))

    def objective():
        with enable_grad():
            return float((_first_output(fn(*inputs)).data * dy).sum())

    report = {"ok": True, "worst_abs": 0.0, "worst_rel": 0.0, "where": None, "checked": ran}
    failures = []
    for i in checked:
        if analytic[i].shape != inputs[i].shape:
            raise GradcheckError(f"gradient check failed: {names[i]} has shape {inputs[i].shape} but its gradient "
                                 f"{analytic[i].shape}")
        failure = _compare(names[i], analytic[i], _numeric_gradient(objective, inputs[i], eps), atol, rtol, report)
        failures += [failure] if failure else []
    if failures:
        report["ok"] = False
        if raise_on_failure:
            raise GradcheckError("gradient check failed (implementations checked: " + ", ".join(ran) + "):\n  "
                                 + "\n  ".join(failures))
    return report


def assert_same(fn_fast, fn_reference, inputs, *, atol: float = 1e-6, rtol: float = 1e-5, seed: int = 0,
                check_grad: bool = True) -> None:
    """Assert that two implementations give the same output and the same input gradients.

    Both functions get fresh tensors over the very arrays of ``inputs`` (not copies, so that each input's
    memory layout reaches both), and neither may change them; gradients are taken with one shared
    random upstream gradient. A failure names what differs (output or which input's gradient) and where.
    """
    before = [backend.to_numpy(v.data).copy() if isinstance(v, Tensor) else None for v in inputs]

    def run(fn):
        fresh = [Tensor(v.data, requires_grad=v.requires_grad) if isinstance(v, Tensor) else v for v in inputs]
        with enable_grad():
            out = _first_output(fn(*fresh))
        return fresh, out

    fast_inputs, fast_out = run(fn_fast)
    ref_inputs, ref_out = run(fn_reference)
    if fast_out.dtype != ref_out.dtype or fast_out.requires_grad != ref_out.requires_grad:
        raise AssertionError(f"output: dtype {fast_out.dtype}, requires_grad {fast_out.requires_grad}; the reference's: "
                             f"dtype {ref_out.dtype}, requires_grad {ref_out.requires_grad}")
    _assert_close("output", fast_out.data, ref_out.data, atol, rtol)
    if check_grad and ref_out.requires_grad:
        _assert_same_gradients(fast_inputs, fast_out, ref_inputs, ref_out, atol, rtol, seed)
    for i, (value, original) in enumerate(zip(inputs, before)):
        if original is not None and not numpy.array_equal(backend.to_numpy(value.data), original, equal_nan=True):
            raise AssertionError(f"input {i} was changed by one of the implementations")


def _assert_same_gradients(fast_inputs, fast_out, ref_inputs, ref_out, atol, rtol, seed):
    dy = backend.to_device(numpy.random.default_rng(seed).standard_normal(ref_out.shape), ref_out.device)
    dy = dy.astype(ref_out.dtype)
    fast_out.backward(dy)
    ref_out.backward(dy)
    for i, (fast, ref) in enumerate(zip(fast_inputs, ref_inputs)):
        if isinstance(ref, Tensor) and ref.requires_grad:
            if fast.grad is None or ref.grad is None:
                raise AssertionError(f"gradient of input {i}: fast {fast.grad is not None}, reference {ref.grad is not None}")
            _assert_close(f"gradient of input {i}", fast.grad, ref.grad, atol, rtol)


def _assert_close(what, actual, expected, atol, rtol):
    actual, expected = backend.to_numpy(actual), backend.to_numpy(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} differs from the reference's {expected.shape}")
    actual, expected = actual.astype(numpy.float64), expected.astype(numpy.float64)
    with numpy.errstate(invalid="ignore"):   # inf − inf
        error = numpy.abs(actual - expected)
    # equal where equal (the same infinity too) or NaN on both sides; else within tolerance, which only finite
    # values can be (inf <= inf would let a finite value pass for an infinity, or −inf for +inf)
    close = numpy.isfinite(actual) & numpy.isfinite(expected) & (error <= atol + rtol * numpy.abs(expected))
    same = (actual == expected) | (numpy.isnan(actual) & numpy.isnan(expected)) | close
    bad = ~same
    if bad.any():
        k = int(numpy.argmax(numpy.where(bad, error, -1.0)))
        index = tuple(map(int, numpy.unravel_index(k, actual.shape)))
        raise AssertionError(f"{what} differs from the reference at {index}: {actual.reshape(-1)[k]!r} vs "
                             f"{expected.reshape(-1)[k]!r} ({int(bad.sum())} of {bad.size} elements out of tolerance)")
