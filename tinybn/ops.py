"""The op registry: every operation once, by name, with its readable forward/backward pair and its kernels.

An op is a pair of pure array functions (the reference), defined where its mathematics lives::

    out, cache = forward(*arrays, **params)
    input_grads = backward(dy, cache)        # one entry per input, None where not needed

    define("sigmoid", sigmoid_forward, sigmoid_backward)              # tinybn/functional/activation.py

A compiled kernel of the same op registers for its name, with its family's label and the test that says when
it applies::

    register_kernel("sigmoid", "numba", sigmoid_forward, sigmoid_backward, applies=...)   # tinybn/numba_kernels

:func:`tinybn.autograd.apply` runs ``choose(op, arrays, params)``: the active family's kernel where one applies,
else the reference. Which family is active, for the process or for one thread, is set through
:mod:`tinybn.kernels` (it starts as ``"reference"``: what you read is what runs), and :func:`observe` lets a
profiler or a test see which implementation of which op ran, without touching the engine.

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

__all__ = ["Implementation", "Op", "Recorder", "active_family", "choose", "define", "family_in_thread", "get",
           "names", "observe", "register_kernel", "set_family"]


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: ``label`` is ``"reference"`` or the kernel family (``"numba"``)."""
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
_family = "reference"                      # the kernel family of the process
_thread = threading.local()                # .family: this thread's, inside family_in_thread; .observers


def define(name: str, forward: Callable, backward: Callable) -> Op:
    """Define the op ``name`` by its reference forward and backward (once per name)."""
    if name in _ops:
        raise ValueError(f"op {name!r} is already defined (by {_ops[name].reference.forward.__module__})")
    op = _ops[name] = Op(name, Implementation(name, "reference", forward, backward))
    return op


def register_kernel(name: str, label: str, forward: Callable, backward: Callable, *, applies: Callable,
                    wants_recording: bool = False) -> Implementation:
    """Add a kernel of the family ``label`` for the op ``name``, used where ``applies(*arrays, **params)`` is true
    and the family is active.

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


def set_family(label: str) -> None:
    """Run the kernels of family ``label`` (or only the reference, ``"reference"``) in every thread that does not
    say otherwise (:func:`family_in_thread`). :func:`tinybn.kernels.use` checks the name and loads the family."""
    global _family
    _family = label


def active_family() -> str:
    """The kernel family that runs in the calling thread."""
    return getattr(_thread, "family", None) or _family


@contextlib.contextmanager
def family_in_thread(label: str):
    """Within the block, and in the calling thread only, run the kernels of family ``label``; on leaving, the
    thread gets back exactly what it had, however blocks of several threads interleave."""
    found = getattr(_thread, "family", None)
    _thread.family = label
    try:
        yield
    finally:
        _thread.family = found


def choose(op: Op, arrays, params) -> Implementation:
    """The implementation to run: the active family's kernel where one applies, else the reference.

    An ``applies`` test that raises (malformed arguments) counts as "does not apply": the reference then
    runs and raises its own, clearer error.
    """
    family = active_family()
    if family != "reference":
        for kernel in op.kernels:
            if kernel.label == family:
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
        [(i.op, i.label, phase) for i, phase in recorder.calls]    # [("conv2d", "numba", "forward"), ...]
    """

    def __init__(self):
        self.calls = []

    def wrap(self, implementation, phase, function):
        def recorded(*args, **kwargs):
            self.calls.append((implementation, phase))
            return function(*args, **kwargs)
        return recorded
