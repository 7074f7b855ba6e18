"""The op registry: every operation once, by name, with its readable forward/backward pair and its kernels.

An op is a pair of pure array functions (the reference), defined where its mathematics lives::

    out, cache = forward(*arrays, **params)
    input_grads = backward(dy, cache)        # one entry per input, None where not needed

    define("sigmoid", sigmoid_forward, sigmoid_backward)              # tinybn/functional/activation.py

A faster kernel for the same op registers for its name, with the test that says when it applies::

    register_kernel("sigmoid", "fast", sigmoid_forward, sigmoid_backward, applies=_sigmoid_applies)  # tinybn/fast

:func:`tinybn.autograd.apply` runs ``choose(op, arrays, params)``: the first enabled kernel whose test
accepts the arrays, else the reference. Kernels are switched on and off by label with :func:`enable`
(``tinybn.fast.set_enabled`` is the documented switch for the ``"fast"`` kernels), and
:func:`observe` lets a profiler or a test see which implementation of which op ran, without
touching the engine.

What the engine hands an op, so that no op works it out itself:

* ``cache.needs_input_grad``: set on the cache of every recorded forward, one flag per input, as in
  PyTorch's ``ctx.needs_input_grad``; a backward may skip the gradients nobody needs;
* ``recording=``: passed to the forward of an implementation registered with ``wants_recording=True``,
  which may then skip what only the backward would need.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable

__all__ = ["Implementation", "Op", "Recorder", "choose", "define", "enable", "enabled", "enabled_in_thread", "get",
           "names", "observe", "register_kernel"]


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: ``label`` is ``"reference"`` or the kernel family (``"fast"``)."""
    op: str
    label: str
    forward: Callable
    backward: Callable
    applies: Callable | None = None       # (*arrays, **params) -> bool; None for the reference
    wants_recording: bool = False

    def __str__(self):
        return f"{self.op} [{self.label}: {self.forward.__module__}.{self.forward.__qualname__}]"


class Op:
    """An op's name, its reference implementation, and the kernels registered for it, in order."""

    def __init__(self, name: str, reference: Implementation):
        self.name, self.reference, self.kernels = name, reference, []

    def __repr__(self):
        return f"Op({self.name!r}, kernels={[k.label for k in self.kernels]})"


_ops: dict[str, Op] = {}
_disabled: set[str] = set()               # kernel labels switched off for the whole process
_thread = threading.local()               # .overrides: label -> bool for this thread; .observers: this thread's


def define(name: str, forward: Callable, backward: Callable) -> Op:
    """Define the op ``name`` by its reference forward and backward (once per name)."""
    if name in _ops:
        raise ValueError(f"op {name!r} is already defined (by {_ops[name].reference.forward.__module__})")
    op = _ops[name] = Op(name, Implementation(name, "reference", forward, backward))
    return op


def register_kernel(name: str, label: str, forward: Callable, backward: Callable, *, applies: Callable,
                    wants_recording: bool = False) -> Implementation:
    """Add a kernel for the op ``name``, used where ``applies(*arrays, **params)`` is true and ``label`` is enabled.

    It must compute exactly what the reference computes (same outputs, same gradients, same cache
    contract); the tests hold every kernel to that.
    """
    if name not in _ops:
        raise KeyError(f"register_kernel: no op named {name!r}; define it first (known: {', '.join(names())})")
    kernel = Implementation(name, label, forward, backward, applies, wants_recording)
    _ops[name].kernels.append(kernel)
    return kernel


def get(name: str) -> Op:
    try:
        return _ops[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; known ops: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_ops)


def enable(label: str, flag: bool = True) -> None:
    """Use (True) or skip (False) every kernel with this label, in every thread that does not say otherwise
    (:func:`enabled_in_thread`); the reference is always available."""
    (_disabled.discard if flag else _disabled.add)(label)


def enabled(label: str) -> bool:
    """Whether kernels with this label run in the calling thread."""
    override = getattr(_thread, "overrides", {}).get(label)
    return label not in _disabled if override is None else override


@contextlib.contextmanager
def enabled_in_thread(label: str, flag: bool):
    """Within the block, and in the calling thread only, use (True) or skip (False) the kernels with this label;
    on leaving, the thread gets back exactly what it had, however blocks of several threads interleave."""
    overrides = _thread.__dict__.setdefault("overrides", {})
    found = overrides.get(label)
    overrides[label] = bool(flag)
    try:
        yield
    finally:
        if found is None:
            overrides.pop(label, None)
        else:
            overrides[label] = found


def choose(op: Op, arrays, params) -> Implementation:
    """The implementation to run: the first enabled kernel that applies, else the reference.

    An ``applies`` test that raises (malformed arguments) counts as "does not apply": the reference then
    runs and raises its own, clearer error.
    """
    for kernel in op.kernels:
        if enabled(kernel.label):
            try:
                if kernel.applies(*arrays, **params):
                    return kernel
            except (TypeError, ValueError):
                pass
    return op.reference


def observers() -> list:
    """The calling thread's observers."""
    return _thread.__dict__.setdefault("observers", [])


@contextlib.contextmanager
def observe(observer):
    """Within the block, in the calling thread, ``observer.wrap(implementation, phase, function)`` is asked for
    the function to run for each forward (``phase="forward"``) and for the backward that forward records
    (``"backward"``, which runs when ``backward()`` does, inside the block or after it); it may return the
    function itself or a wrapper (a profiler times it, a recorder counts it)."""
    mine = observers()
    mine.append(observer)
    try:
        yield observer
    finally:
        mine.remove(observer)


class Recorder:
    """An observer that lists ``(implementation, phase)`` for every forward and backward run::

        with ops.observe(ops.Recorder()) as recorder:
            loss = net(x) ...
        [(i.op, i.label, phase) for i, phase in recorder.calls]    # [("conv2d", "fast", "forward"), ...]
    """

    def __init__(self):
        self.calls = []

    def wrap(self, implementation, phase, function):
        def recorded(*args, **kwargs):
            self.calls.append((implementation, phase))
            return function(*args, **kwargs)
        return recorded
